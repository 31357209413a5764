"""The one decode engine: rows of different lengths, adapters (any K, any layers) and images in one
batch, rows joining and leaving, cancellation; and the one loader's template rule and checks."""

import pytest
import torch
from helpers import STORIES, tiny_llama

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, load_adapter, save_adapter, stack_prompts
from llama_adapter.engine import Engine, Row
from llama_adapter.generate import generate
from llama_adapter.loading import load_stack, resolve_template
from llama_adapter.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_new_tokens=6)


def random_adapter(base, *, L, K, act="tanh", seed=1) -> AdaptedLLaMA:
    g = torch.Generator().manual_seed(seed)
    ad = AdaptedLLaMA(base, AdapterConfig(adapter_len=K, adapter_layers=L, gate_activation=act))
    with torch.no_grad():
        ad.adapter.prompts.copy_(torch.randn(ad.adapter.prompts.shape, generator=g))
        ad.adapter.gates.copy_(torch.rand(ad.adapter.gates.shape, generator=g) * 2 - 1)
    return ad.eval()


@pytest.fixture
def two_adapters(tmp_path):
    """One frozen base and two saved adapters of different K, L and gate activation."""
    base = tiny_llama(n_layers=4, std=0.1, frozen=True)
    for name, L, K, act, seed in (("a", 2, 3, "tanh", 1), ("b", 3, 5, "identity", 2)):
        save_adapter(random_adapter(base, L=L, K=K, act=act, seed=seed), tmp_path / name)
    return base, tmp_path


def test_mixed_rows_match_each_adapter_alone(two_adapters):
    """Rows of two adapters (K 3 and 5, 2 and 3 layers) and the frozen base in one forward equal
    each row run with its own adapter; the base's tensors are shared, never copied."""
    base, d = two_adapters
    ptrs = {k: v.data_ptr() for k, v in base.state_dict().items()}
    a, b = load_adapter(base, d / "a"), load_adapter(base, d / "b")
    states = {"a": a.prompt_state(precompute=True), "b": b.prompt_state(precompute=True), None: None}
    names = ["a", "b", None, "a"]
    idx = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = base(idx, ctx=stack_prompts([states[n] for n in names]))
        for r, name in enumerate(names):
            want = base(idx[r : r + 1]) if name is None else {"a": a, "b": b}[name](idx[r : r + 1])
            torch.testing.assert_close(got[r : r + 1], want, atol=1e-6, rtol=1e-6)
    assert {k: v.data_ptr() for k, v in base.state_dict().items()} == ptrs


def test_engine_mixed_batch_generates_what_each_row_generates_alone(two_adapters):
    base, d = two_adapters
    a, b = load_adapter(base, d / "a"), load_adapter(base, d / "b")
    prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 8], [11, 12, 13, 14, 15]]
    models = [b, base, a, b]
    engine = Engine(base, max_batch=4, max_len=32)
    rows = [
        Row(p, GREEDY, prompt=None if m is base else m.prompt_state(precompute=True)) for p, m in zip(prompts, models)
    ]
    engine.run(rows)
    for p, m, r in zip(prompts, models, rows):
        assert generate(m, [p], GREEDY) == [r.tokens]
    assert engine.stats["steps"] == GREEDY.max_new_tokens - 1  # one shared step per token


def test_rows_join_leave_and_reuse_slots():
    """Three slots, eight rows of different lengths and budgets: rows join as others finish, and
    every row equals its own unbatched greedy decoding."""
    model = tiny_llama(n_layers=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 61, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (8,), generator=g)]
    budgets = [3, 9, 1, 6, 12, 2, 7, 5]
    rows = [Row(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, budgets)]
    engine = Engine(model, max_batch=3, max_len=24)
    engine.run(rows)
    for p, n, r in zip(prompts, budgets, rows):
        assert r.finish == "length" and generate(model, [p], SamplingParams(max_new_tokens=n)) == [r.tokens]
    assert not engine.rows


def test_cancel_and_stop_tokens():
    model = tiny_llama(n_layers=2)
    engine = Engine(model, max_batch=2, max_len=32)
    free_run = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10))[0]
    flag = {"stop": False}
    cancelled = Row([1, 2, 3], SamplingParams(max_new_tokens=10), cancelled=lambda: flag["stop"])
    stopped = Row([1, 2, 3], SamplingParams(max_new_tokens=10), stop_ids={free_run[4]})
    engine.add([cancelled, stopped])
    for _ in range(2):
        engine.step()
    flag["stop"] = True
    ended = engine.step()
    assert cancelled in ended and cancelled.finish == "cancelled" and len(cancelled.tokens) == 3
    while engine.rows:
        engine.step()
    assert stopped.finish == "stop" and stopped.tokens == free_run[: free_run.index(free_run[4])]


def test_engine_errors():
    model = tiny_llama(n_layers=2)
    engine = Engine(model, max_batch=1, max_len=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add([Row([], GREEDY)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add([Row([99], GREEDY)])
    with pytest.raises(ValueError, match="prompt has 9 tokens, this engine holds 8"):
        engine.add([Row([1] * 9, GREEDY)])
    with pytest.raises(ValueError, match="do not fit"):
        engine.add([Row([1], GREEDY), Row([2], GREEDY)])


# ------------------------------------------------------------------------------------ the one loader
class _Tok:
    def __init__(self, chat_template=None):
        self.chat_template = chat_template


@pytest.mark.parametrize(
    "requested, chat, meta, purpose, want",
    [
        ("alpaca", "chatml", {"template": "chatml"}, "complete", "alpaca"),  # explicit wins
        ("auto", None, {"template": "chatml"}, "complete", "chatml"),  # the adapter's recorded one
        (None, "chatml", {}, "chat", "alpaca"),  # an adapter that recorded none: Alpaca-trained
        ("auto", "chatml", None, "complete", "chatml"),  # the tokenizer's chat template
        ("auto", None, None, "complete", "plain"),
        ("auto", None, None, "instruct", "alpaca"),
        ("auto", None, None, "chat", "chatml"),
    ],
)
def test_one_template_rule(requested, chat, meta, purpose, want):
    assert resolve_template(requested, _Tok(chat), meta, purpose) == want


def test_template_errors():
    with pytest.raises(ValueError, match="unknown template 'jinja'"):
        resolve_template("jinja", _Tok())
    with pytest.raises(ValueError, match="purpose"):
        resolve_template("auto", _Tok(), None, "talk")


def test_load_stack_refuses_two_adapters_that_change_the_base(tmp_path):
    from llama_adapter.checkpoint import load_model

    base = load_model(STORIES)
    save_adapter(AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2)), tmp_path / "v1")
    v2 = AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, bias_scale=True))
    save_adapter(v2, tmp_path / "v2")
    stack = load_stack(str(STORIES), {"v1": str(tmp_path / "v1")})
    assert stack.template == "plain" and stack.adapters["v1"].template == "alpaca"
    with pytest.raises(ValueError, match="changes the base model's modules"):
        load_stack(str(STORIES), {"v1": str(tmp_path / "v1"), "v2": str(tmp_path / "v2")})
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        stack.adapter("nope")
