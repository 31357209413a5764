"""Generation: KV-cache decoding matches full recomputation, left-padded batches match single
prompts, stopping, sampling controls, and (when the real checkpoints load) text generation."""

from __future__ import annotations

import warnings

import helpers
import pytest
import torch

from llama_adapter.config import Config
from llama_adapter.generate import Sampler, SamplingParams, StopText, generate, generate_text
from llama_adapter.model import LLaMA

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=12)
PROMPTS = [[1, 5, 7, 9, 11, 13], [3, 4], [8, 8, 2, 1, 6, 7, 30, 31, 2], [42]]


@pytest.fixture(scope="module")
def model() -> LLaMA:
    torch.manual_seed(0)
    m = LLaMA(Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=48))
    m.reset_parameters(0.3)  # peaked logits, so greedy choices are not near-ties
    return m.eval()


def greedy_no_cache(model: LLaMA, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_cached_greedy_equals_full_recompute(model):
    for p in PROMPTS:
        assert generate(model, [p], GREEDY)[0] == greedy_no_cache(model, p, GREEDY.max_new_tokens)


def test_left_padded_batch_equals_each_prompt_alone(model):
    batched = generate(model, PROMPTS, GREEDY)
    assert batched == [generate(model, [p], GREEDY)[0] for p in PROMPTS]
    assert all(len(o) == GREEDY.max_new_tokens for o in batched)


def test_stop_ids_end_rows_independently(model):
    free = generate(model, PROMPTS, GREEDY)
    stop = free[0][4]
    out = generate(model, PROMPTS, GREEDY, stop_ids={stop})
    for f, o in zip(free, out):
        cut = f.index(stop) if stop in f else len(f)
        assert o == f[:cut]  # stop id excluded; other rows unaffected by a finished row
    assert out[0] == free[0][: free[0].index(stop)]


def test_max_new_tokens_and_context_clamp(model):
    assert [len(o) for o in generate(model, PROMPTS, SamplingParams(max_new_tokens=3))] == [3] * len(PROMPTS)
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=0)) == [[]] * len(PROMPTS)
    long = list(range(1, 41))  # 40 of 48 positions: only 8 left
    assert len(generate(model, [long], SamplingParams(max_new_tokens=100))[0]) == 8


def test_too_long_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="prompt has 49 tokens, the model's context is 48; shorten it"):
        generate(model, [[1] * 49], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], GREEDY)


def test_callback_sees_tokens_and_can_stop(model):
    seen: list[tuple[int, int]] = []
    out = generate(model, PROMPTS[:2], GREEDY, callback=lambda r, t: seen.append((r, t)))
    assert sorted(seen) == sorted((r, t) for r, o in enumerate(out) for t in o)
    calls = []

    def stop_after_three(row: int, tok: int) -> bool:
        calls.append(tok)
        return len(calls) < 3

    short = generate(model, [PROMPTS[0]], GREEDY, callback=stop_after_three)
    assert short == [out[0][:3]]


def test_seeded_sampling_is_reproducible(model):
    p = SamplingParams(max_new_tokens=16, temperature=1.5, seed=123)
    a = generate(model, PROMPTS, p)
    torch.manual_seed(999)  # the global RNG does not matter
    assert generate(model, PROMPTS, p) == a
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.5, seed=124)) != a


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, GREEDY)
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1, seed=0)) == greedy
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=0)) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2, seed=0), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.8, seed=0), {0, 1}),  # p = .64, .24, ...: two reach .8
    ]:
        s = Sampler(params, [[0]], 5, "cpu")
        assert {int(s(logits)[0]) for _ in range(200)} == allowed


def test_repetition_penalty(model):
    p = SamplingParams(max_new_tokens=16, repetition_penalty=5.0)
    a = generate(model, PROMPTS, p)
    assert a == generate(model, PROMPTS, p)  # deterministic
    assert a != generate(model, PROMPTS, SamplingParams(max_new_tokens=16))
    # CTRL rule on the logits of seen tokens: positive / r, negative * r.
    s = Sampler(SamplingParams(repetition_penalty=2.0), [[0, 1]], 4, "cpu")
    assert int(s(torch.tensor([[3.0, -1.0, 1.6, -5.0]]))[0]) == 2  # 3/2 = 1.5 < 1.6
    assert int(s(torch.tensor([[0.0, 1.0, 1.1, 0.9]]))[0]) == 3  # 2 is now seen too: 0.55 < 0.9


def test_repeated_greedy_penalised_fewer_repeats(model):
    free = generate(model, [[5]], SamplingParams(max_new_tokens=30))[0]
    pen = generate(model, [[5]], SamplingParams(max_new_tokens=30, repetition_penalty=10.0))[0]
    assert len(set(pen)) >= len(set(free))


def test_invalid_params():
    for kw in [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0)]:
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_stop_text_never_streams_a_stop_fragment():
    s = StopText(["</s>", "###"])
    pieces = ["Hello <", "/", "world #", "#", " and ##", "#tail"]
    out = "".join(s.push(x) for x in pieces)
    assert s.hit and out == "Hello </world ## and "
    s = StopText(["END"])
    assert s.push("abcE") == "abc" and s.push("N") == "" and s.flush() == "EN" and not s.hit


def test_compile_failure_falls_back_to_eager(model, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        out = generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=4), compile=True)
    assert out == generate(model, PROMPTS[:2], SamplingParams(max_new_tokens=4))


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens(model):
    out = generate(model, PROMPTS, GREEDY, compile=True)
    assert out == generate(model, PROMPTS, GREEDY)


@pytest.mark.slow
def test_compiled_decode_on_packed_weights_gives_the_same_tokens():
    """The packed kernels are custom ops with fake implementations, so the compiled step keeps them in
    its graph; rows in step (one int position) and rows at different positions (a tensor) both agree."""
    from llama_adapter.checkpoint import load_model
    from llama_adapter.quant import kernels_available

    if not kernels_available():
        pytest.skip("the AVX2 kernels are not available here")
    q = load_model(helpers.STORIES, weights="q8_0", progress=False)
    q.fuse_projections()
    same = [[1, 403, 407, 261, 378]] * 2
    mixed = [[1, 403, 407], [1, 403, 407, 261, 378, 300, 5]]
    for prompts in (same, mixed):
        params = SamplingParams(max_new_tokens=12)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass unnoticed
            compiled = generate(q, prompts, params, compile=True)
        assert compiled == generate(q, prompts, params)


# ------------------------------------------------------------------------ real checkpoints (when they load)
@pytest.fixture(scope="module")
def stories():
    return helpers.stories260k()


def test_stories260k_tells_a_story_about_lily(stories):
    model, tok = stories
    ids = generate(
        model, [tok.encode("Once upon a time", bos=True)], SamplingParams(max_new_tokens=80), stop_ids=tok.stop_ids
    )[0]
    assert "Lily" in tok.decode(ids)


def test_generate_text_streams_and_cuts_at_stop_strings(stories):
    model, tok = stories
    base = generate_text(model, tok, ["Once upon a time"], SamplingParams(max_new_tokens=80))[0]
    assert "Lily" in base
    stop = "Lily"
    deltas: list[str] = []
    out = generate_text(
        model,
        tok,
        ["Once upon a time", "Lily"],
        SamplingParams(max_new_tokens=80, stop=[stop]),
        on_text=lambda r, d: deltas.append(d) if r == 0 else None,
    )
    assert out[0] == base[: base.index(stop)]
    assert "".join(deltas) == out[0]
    assert all(stop not in d for d in deltas) and stop not in out[1]
