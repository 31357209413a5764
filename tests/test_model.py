"""Our LLaMA against transformers' LlamaForCausalLM with the same random weights (loaded through our HF loader)."""

import pytest
import torch

from llama_adapter.checkpoint import load_model, save_hf

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip
CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3.1-rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        # original_max_position_embeddings small enough that all three frequency bands occur
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),  # fmt: skip
}


def hf_model(name: str):
    cfg = transformers.LlamaConfig(**{**BASE, **CONFIGS[name]}, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return m.eval()


def hf_logits(m, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours = load_model(d, progress=False)
    assert ours.config.extra["format"] == "hf"
    assert (ours.config.rope_scaling is not None) == ("rope_scaling" in CONFIGS[request.param])
    return hf, ours


def test_logits_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_kv_cache_prefill_and_decode_match_transformers(pair):
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (2, 11))
    full = hf_logits(hf, ids)
    cache = ours.new_cache(2, 32)
    with torch.no_grad():
        steps = [ours(ids[:, :8], cache=cache)]
        for t in range(8, 11):
            steps.append(ours(ids[:, t : t + 1], start=t, cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_rows_of_different_lengths_share_a_cache(pair):
    """The decode engine's layout: right-padded prompts prefilled together (logits taken at each
    row's last real token), then one-token steps at per-row positions; every row equals
    transformers on that row alone."""
    hf, ours = pair
    torch.manual_seed(3)
    lengths = [9, 5, 7]
    rows = [torch.randint(0, 128, (1, n)) for n in lengths]
    T = max(lengths)
    batch = torch.stack([torch.cat([r[0], torch.zeros(T - n, dtype=torch.long)]) for r, n in zip(rows, lengths)])
    nxt = torch.randint(0, 128, (3, 2))
    with torch.no_grad():
        cache = ours.new_cache(3, 16)
        last = ours(batch, cache=cache, keep=torch.tensor(lengths) - 1)
        pos = torch.tensor(lengths)
        steps = [ours(nxt[:, i : i + 1], start=pos + i, cache=cache) for i in range(2)]
    for i, (r, n) in enumerate(zip(rows, lengths)):
        full = hf_logits(hf, torch.cat([r, nxt[i : i + 1]], dim=1))[0]
        torch.testing.assert_close(last[i, 0], full[n - 1], atol=1e-5, rtol=0)
        for j in range(2):
            torch.testing.assert_close(steps[j][i, 0], full[n + j], atol=1e-5, rtol=0)


def test_save_hf_loads_in_transformers(pair, tmp_path):
    hf, ours = pair
    save_hf(ours, tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert again.config.tie_word_embeddings == ours.config.tie_embeddings
    assert again.config.num_key_value_heads == ours.config.n_kv_heads
    ids = torch.randint(0, 128, (1, 10))
    torch.testing.assert_close(hf_logits(again, ids), hf_logits(hf, ids), atol=1e-6, rtol=0)
    # and back: our loader reads what we wrote
    torch.testing.assert_close(load_model(tmp_path).state_dict()["output.weight"], ours.output.weight)


@pytest.mark.parametrize("bad", [dict(n_kv_heads=0), dict(hidden_dim=-1), dict(vocab_size=0), dict(max_seq_len=0)])
def test_config_sizes_must_be_positive(bad):
    from llama_adapter.config import Config

    with pytest.raises(ValueError, match="must be positive integers"):
        Config(**bad)
