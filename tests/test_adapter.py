import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from llama_adapter.adapter import (
    AdaptedLLaMA,
    AdapterConfig,
    adapter_state_dict,
    count_trainable,
    load_adapter,
    param_groups,
    save_adapter,
)
from llama_adapter.config import Config
from llama_adapter.model import LLaMA


def reference_forward(base: LLaMA, prompts: torch.Tensor, gates: torch.Tensor, L: int, idx: torch.Tensor):
    """Independent re-implementation of the official LLaMA-Adapter forward (alpaca_finetuning_v1):
    concatenated [prompt | sequence] scores, each block softmaxed on its own, gate on the prompt
    block, interleaved-free rotate-half RoPE, explicit repeat of K/V heads."""
    c = base.config
    hd, H, Hkv = c.head_dim, c.n_heads, c.n_kv_heads
    B, T = idx.shape
    K = prompts.shape[0] // L
    pos = torch.arange(T).float()
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [B, T, h, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos[None, :, None] + torch.cat([-x2, x1], -1) * sin[None, :, None]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps))

    h = base.tok_embeddings.weight[idx]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i, layer in enumerate(base.layers):
        a = layer.attention
        x = rms(h, layer.attention_norm.weight)
        q = rope((x @ a.wq.weight.T).view(B, T, H, hd))
        k = rope((x @ a.wk.weight.T).view(B, T, Hkv, hd))
        v = (x @ a.wv.weight.T).view(B, T, Hkv, hd)
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1)
        j = i - (c.n_layers - L)
        if j >= 0:
            p = prompts[j * K : (j + 1) * K]
            ak = (p @ a.wk.weight.T).view(1, K, Hkv, hd).repeat_interleave(H // Hkv, 2).transpose(1, 2)
            av = (p @ a.wv.weight.T).view(1, K, Hkv, hd).repeat_interleave(H // Hkv, 2).transpose(1, 2)
            ascores = torch.tanh(gates[j])[None, :, None, None] * F.softmax(
                q @ ak.transpose(-1, -2) / math.sqrt(hd), -1
            )
            scores = torch.cat([ascores, scores], -1)
            v = torch.cat([av.expand(B, -1, -1, -1), v], 2)
        out = (scores @ v).transpose(1, 2).reshape(B, T, H * hd)
        h = h + out @ a.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, base.norm.weight) @ base.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_step0_is_bit_identical_to_frozen_model(n_kv_heads):
    base = tiny_llama(n_kv_heads)
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        ref = base(idx).clone()
        model = AdaptedLLaMA(base, AdapterConfig(adapter_len=5, adapter_layers=2))
        out = model(idx)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_matches_independent_official_forward_with_open_gates(n_kv_heads):
    base = tiny_llama(n_kv_heads)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        model.adapter.gates.normal_(0, 1.0)
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        ours = model(idx)
        ref = reference_forward(base, model.adapter.prompts, model.adapter.gates, 2, idx)
        frozen = model.detach_base()(idx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - frozen).abs().max() > 1e-3  # the prompts really do something


def test_llama7b_parameter_count_on_meta_device():
    with torch.device("meta"):
        base = LLaMA(Config.from_name("llama-7b"))
        model = AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=30))
    assert count_trainable(model) == 1_229_760
    assert model.adapter.prompts.shape == (300, 4096)
    # fp32 file size ~4.7 MB
    assert abs(count_trainable(model) * 4 / 1e6 - 4.9) < 0.1


def test_only_adapter_trainable_and_two_steps_in_a_row():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=4, adapter_layers=2)).train()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"adapter.prompts", "adapter.gates"}
    assert set(adapter_state_dict(model)) == names
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-2)
    idx = torch.randint(0, 61, (2, 10))
    p0 = model.adapter.prompts.detach().clone()
    losses = []
    for _ in range(3):  # must not reuse a graph freed by the previous backward
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 61), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(model.adapter.prompts, p0)
    assert model.adapter.gates.abs().sum() > 0
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_bottom_layers_build_no_graph():
    base = tiny_llama()
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=1))
    seen = {}
    for i, layer in enumerate(base.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
    model(torch.randint(0, 61, (1, 5))).sum().backward()
    assert seen == {0: False, 1: False, 2: True}
    assert model.adapter.gates.grad is not None


def test_prompts_stay_out_of_kv_cache_and_precompute_matches():
    base = tiny_llama()
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=3))
    with torch.no_grad():
        model.adapter.gates.fill_(0.7)
        idx = torch.randint(0, 61, (1, 8))
        full = model(idx)
        ctx = model.prompt_state(precompute=True)
        cache = model.new_cache(1, 16)
        outs = [model(idx[:, :5], cache=cache, ctx=ctx)]
        for t in range(5, 8):
            outs.append(model(idx[:, t : t + 1], start=t, cache=cache, ctx=ctx))
        # The cache's filled part holds sequence tokens only.
        assert cache[0].k[:, :, 8:].abs().sum() == 0
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_precomputed_state_is_rebuilt_after_weights_change():
    base = tiny_llama()
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2))
    idx = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        model.adapter.gates.fill_(0.5)
        a = model(idx, ctx=model.prompt_state(precompute=True))
        model.adapter.prompts.add_(1.0)
        b = model(idx, ctx=model.prompt_state(precompute=True))
        c = model(idx)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)


def test_gqa_prompt_kv_has_kv_heads():
    base = tiny_llama(n_kv_heads=2)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=1))
    k, v = base.layers[-1].attention.prompt_kv(model.prompt_state().get(2).prompt)
    assert k.shape == (1, 2, 3, 8) and v.shape == (1, 2, 3, 8)


def test_save_load_roundtrip_and_mismatch(tmp_path):
    base = tiny_llama()
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        model.adapter.gates.normal_()
    save_adapter(model, tmp_path / "a", metadata={"train": {"steps": 3}})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    idx = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    other = tiny_llama(n_kv_heads=4)
    other.config.n_layers = other.config.n_layers  # same shape family, different kv heads
    with pytest.raises(ValueError, match="n_kv_heads"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), tmp_path)


def test_bad_adapter_configs():
    with pytest.raises(ValueError, match="at least one"):
        AdaptedLLaMA(tiny_llama(), AdapterConfig(adapter_len=0, adapter_layers=1))
    with pytest.raises(ValueError, match="model has 3 layers"):
        AdaptedLLaMA(tiny_llama(), AdapterConfig(adapter_len=2, adapter_layers=4))


def test_visual_projection_zero_init_and_row_masking():
    base = tiny_llama()
    idx = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        ref = base(idx).clone()
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2, visual_dim=10))
    assert "adapter_visual.fc1.weight" in adapter_state_dict(model)
    assert model.adapter_visual.fc1.weight.requires_grad
    feats = torch.randn(2, 10)
    with torch.no_grad():
        assert torch.equal(model(idx, ctx=model.prompt_state(visual=feats)), ref)
        model.adapter.gates.fill_(1.0)
        no_img = model(idx)
        mixed = model(idx, ctx=model.prompt_state(visual=feats, has_image=torch.tensor([True, False])))
    torch.testing.assert_close(mixed[1], no_img[1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(mixed[0], no_img[0])
    text_only = AdaptedLLaMA(tiny_llama(), AdapterConfig(adapter_len=3, adapter_layers=2))
    with pytest.raises(ValueError, match="text-only"):
        text_only.prompt_state(visual=feats)
