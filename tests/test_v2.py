import pytest
import torch
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
from llama_adapter.config import v2_trainable_count
from llama_adapter.model import LLaMA
from llama_adapter.v2 import (
    AdapterRMSNorm,
    BindNetwork,
    ScaledLinear,
    fold_bias_scale,
    folded_llama,
)

V2 = dict(bias_scale=True, train_norms=True)


def v1_count(m: LLaMA, cfg: AdapterConfig) -> int:
    return cfg.adapter_layers * (cfg.adapter_len * m.config.dim + m.config.n_heads)


def idx(seed=1, B=2, T=9):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model: AdaptedLLaMA, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("opts", [dict(bias_scale=True), dict(train_norms=True), V2])
def test_v2_step0_bit_identical(n_kv_heads, opts):
    base = tiny_llama(n_kv_heads)
    x = idx()
    with torch.no_grad():
        ref = base(x)
        m = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2, **opts))
        out = m(x)
    assert torch.equal(out, ref)
    assert (out - ref).abs().max().item() == 0.0


def test_v2_trainable_count_and_predicate():
    base = tiny_llama(2)
    cfg = AdapterConfig(adapter_len=3, adapter_layers=2, **V2)
    m = AdaptedLLaMA(base, cfg)
    c = base.config
    hd = c.head_dim
    per_layer = 2 * (c.n_heads * hd + 2 * c.n_kv_heads * hd + 2 * c.dim + 2 * c.hidden_dim)
    norms = (2 * c.n_layers + 1) * c.dim
    assert v2_trainable_count(c, cfg) == c.n_layers * per_layer + norms
    assert count_trainable(m) == v1_count(base, cfg) + c.n_layers * per_layer + norms
    sd = adapter_state_dict(m)
    assert sum(t.numel() for t in sd.values()) == count_trainable(m)
    assert "model.layers.0.attention.wq.adapter_scale" in sd and "model.norm.adapter_weight" in sd
    assert not any(k.endswith(".weight") and "adapter" not in k for k in sd)
    groups = param_groups(m, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    # only the [L*K, dim] prompt matrix is decayed; biases, scales, norms and gates are not
    assert decayed == {id(m.adapter.prompts)}
    # base weights stay frozen, and every block linear is wrapped
    assert not base.layers[0].attention.wq.weight.requires_grad
    assert all(isinstance(getattr(b.feed_forward, n), ScaledLinear) for b in base.layers for n in ("w1", "w2", "w3"))
    assert isinstance(base.layers[0].attention_norm, AdapterRMSNorm)


def test_v2_trains_and_detach_restores_base():
    base = tiny_llama(2)
    x = idx()
    with torch.no_grad():
        ref = base(x).clone()
    w0 = base.norm.weight.detach().clone()
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=1, **V2))
    opt = torch.optim.AdamW(param_groups(m, 0.0), lr=1e-2)
    for _ in range(2):
        loss = m(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert base.layers[0].attention.wk.adapter_bias.abs().sum() > 0  # lowest layer got gradients
    assert not torch.equal(base.layers[0].ffn_norm.adapter_weight, base.layers[0].ffn_norm.base_norm[0].weight)
    plain = m.detach_base()
    assert type(plain.layers[0].attention.wq) is torch.nn.Linear
    assert torch.equal(plain.norm.weight, w0)
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


def test_v2_save_load_roundtrip(tmp_path):
    base = tiny_llama(2)
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, **V2))
    perturb(m)
    x = idx()
    with torch.no_grad():
        want = m(x)
    save_adapter(m, tmp_path / "a")
    fresh = load_adapter(tiny_llama(2), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


@pytest.mark.parametrize("zero_bias", [True, False])
def test_fold_bias_scale_gives_identical_logits(zero_bias):
    base = tiny_llama(2).double()
    cfg = AdapterConfig(adapter_len=2, adapter_layers=2, **V2)
    m = AdaptedLLaMA(base, cfg)
    perturb(m)
    if zero_bias:
        with torch.no_grad():
            for mod in base.modules():
                if isinstance(mod, ScaledLinear):
                    mod.adapter_bias.zero_()
        with pytest.raises(ValueError, match="allow_bias"):
            torch.nn.init.ones_(base.layers[0].attention.wq.adapter_bias.data)
            fold_bias_scale(m.model)
        with torch.no_grad():
            base.layers[0].attention.wq.adapter_bias.zero_()
    x = idx()
    with torch.no_grad():
        want = m(x)
    sd = fold_bias_scale(m.model, allow_bias=not zero_bias)
    assert not any("adapter" in k for k in sd)
    assert any(k.endswith(".bias") for k in sd) == (not zero_bias)
    plain = folded_llama(base.config, sd).double().eval()
    folded = AdaptedLLaMA(plain, AdapterConfig(adapter_len=2, adapter_layers=2))
    folded.adapter.load_state_dict(m.adapter.state_dict())
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_early_fusion_only_first_layers_see_image():
    base = tiny_llama(2)
    x = idx()
    with torch.no_grad():
        ref = base(x)
    cfg = AdapterConfig(adapter_len=2, adapter_layers=3, visual_dim=7, visual_layers=1)
    m = AdaptedLLaMA(base, cfg)
    feats = torch.randn(2, 7)
    with torch.no_grad():
        assert torch.equal(m(x, ctx=m.prompt_state(visual=feats)), ref)
        text = m.prompt_state()
        img = m.prompt_state(visual=feats)
    first, *later = m.adapted_layers
    assert not torch.equal(img.get(first).prompt.expand(2, -1, -1), text.get(first).prompt.expand(2, -1, -1))
    for i in later:
        assert torch.equal(img.get(i).prompt, text.get(i).prompt)


def test_bad_v2_configs_name_the_option():
    base = tiny_llama(2)
    with pytest.raises(ValueError, match="drop visual_layers"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, visual_layers=1))
    with pytest.raises(ValueError, match="drop visual_layers"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, visual_dim=5, visual_layers=3))
    with pytest.raises(ValueError, match="drop them"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, bind_blocks=2))


def test_bind_zero_init_count_and_gradients():
    base = tiny_llama(2)
    x = idx()
    with torch.no_grad():
        ref = base(x)
    cfg = AdapterConfig(adapter_len=2, adapter_layers=1, bind_dim=11, bind_blocks=2, bind_hidden=20)
    m = AdaptedLLaMA(base, cfg)
    emb = torch.randn(2, 11)
    with torch.no_grad():
        assert torch.equal(m(x, ctx=m.prompt_state(bind=emb)), ref)
    c = base.config
    bind = 11 * c.dim + c.dim + 2 * (c.dim + 3 * c.dim * 20)
    assert sum(p.numel() for p in BindNetwork(11, c.dim, 2, 20).parameters()) == bind
    assert v2_trainable_count(c, cfg) == bind + c.n_layers
    assert count_trainable(m) == v1_count(base, cfg) + bind + c.n_layers
    # gates get a gradient from the bottom layer on; after a step the image changes the output
    loss = m(x, ctx=m.prompt_state(bind=emb)).logsumexp(-1).mean()
    loss.backward()
    assert base.layers[0].adapter_bind_gate.grad is not None and base.layers[0].adapter_bind_gate.grad != 0
    with torch.no_grad():
        base.layers[0].adapter_bind_gate.fill_(0.5)
        assert not torch.equal(m(x, ctx=m.prompt_state(bind=emb)), ref)
        masked = m(x, ctx=m.prompt_state(bind=emb, has_image=torch.tensor([False, True])))
        assert torch.equal(masked[0], ref[0]) and not torch.equal(masked[1], ref[1])
    plain = m.detach_base()
    assert type(plain.layers[0]).__name__ == "Block" and not hasattr(plain.layers[0], "adapter_bind_gate")


def test_fold_zero_bias_exports_to_hf_and_reloads(tmp_path):
    from llama_adapter.checkpoint import load_model, save_hf

    base = tiny_llama(2)
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=1, bias_scale=True, train_norms=True))
    perturb(m)
    with torch.no_grad():
        for mod in base.modules():
            if isinstance(mod, ScaledLinear):
                mod.adapter_bias.zero_()
    m.adapter.gates.data.zero_()  # compare the base path only: prompts are not part of the export
    x = idx()
    with torch.no_grad():
        want = m(x)
    save_hf(folded_llama(base.config, fold_bias_scale(m.model)), tmp_path / "hf")
    reloaded = load_model(tmp_path / "hf", progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ visual-query blocks
def vq_config(**kw) -> AdapterConfig:
    """5 encoder tokens of width 7 (flattened: visual_dim 35), 2 blocks of width 16."""
    base = dict(adapter_len=3, adapter_layers=3, visual_dim=35, visual_tokens=5, visual_token_dim=7,
                visual_query_blocks=2, visual_query_dim=16)  # fmt: skip
    base.update(kw)
    return AdapterConfig(**base)


@pytest.mark.parametrize("extra", [{}, V2, dict(visual_layers=1)])
def test_visual_query_step0_equals_frozen_with_and_without_image(extra):
    base = tiny_llama(2)
    x = idx()
    with torch.no_grad():
        ref = base(x)
        m = AdaptedLLaMA(base, vq_config(**extra))
        tokens = torch.randn(2, 5, 7)
        for ctx in (None, m.prompt_state(visual=tokens), m.prompt_state(visual=tokens.flatten(1)),
                    m.prompt_state(visual=tokens, has_image=torch.tensor([True, False]))):  # fmt: skip
            assert torch.equal(m(x, ctx=ctx), ref)


def test_visual_query_trainable_count_matches_formula():
    base = tiny_llama(2)
    c = base.config
    cfg = vq_config()
    m = AdaptedLLaMA(base, cfg)
    N, d, K, w, B = 5, 7, 3, 16, 2
    # Counted module by module here (not with v2.visual_query_count's grouping).
    token_in = (d * w + w) + 2 * w + N * w  # projection, LayerNorm, positions
    block = 2 * (2 * w) + (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    out = (w * c.dim + c.dim) + 2 * c.dim
    vq = token_in + K * w + B * block + out
    assert sum(p.numel() for p in m.adapter_visual.parameters()) == vq
    assert v2_trainable_count(c, cfg) == vq
    assert count_trainable(m) == v1_count(base, cfg) + vq
    # with V2 bias/scale + norms on top, the counts add
    cfg2 = vq_config(**V2)
    assert count_trainable(AdaptedLLaMA(tiny_llama(2), cfg2)) == v1_count(base, cfg2) + v2_trainable_count(c, cfg2)
    assert v2_trainable_count(c, cfg2) == vq + v2_trainable_count(c, AdapterConfig(**V2))
    # model-width default for the blocks
    wide = vq_config(visual_query_dim=0)
    assert sum(p.numel() for p in AdaptedLLaMA(tiny_llama(2), wide).adapter_visual.parameters()) == v2_trainable_count(
        c, wide
    )
    assert all(n.startswith("adapter_visual.") for n, _ in m.named_parameters() if "visual" in n)


def test_visual_query_adds_one_vector_per_prompt_position_in_fused_layers():
    base = tiny_llama(2)
    m = AdaptedLLaMA(base, vq_config(visual_layers=2))
    perturb(m)
    tokens = torch.randn(2, 5, 7)
    has = torch.tensor([True, False])
    x = idx()
    with torch.no_grad():
        text = m.prompt_state()
        img = m.prompt_state(visual=tokens, has_image=has)
        vp = m.visual_prompt(tokens)
        assert vp.shape == (2, 3, base.config.dim)
        assert not torch.allclose(vp[:, 0], vp[:, 1])  # distinct queries -> distinct positions
        for j, i in enumerate(m.adapted_layers):
            if j < 2:  # early fusion: the first two adapted layers get query j at position j
                got = img.get(i).prompt - text.get(i).prompt
                torch.testing.assert_close(got, vp * has[:, None, None], rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(img.get(i).prompt, text.get(i).prompt)
        out = m(x, ctx=img)
        none = m(x, ctx=m.prompt_state(visual=tokens, has_image=torch.tensor([False, False])))
        plain = m(x)
    # the row without an image is exactly the text-only adapter (bit-equal at the same batch
    # shapes; [1, K, dim] vs [B, K, dim] prompts may round differently); the image row is not
    assert torch.equal(out[1], none[1]) and not torch.allclose(out[0], plain[0])
    torch.testing.assert_close(none, plain, rtol=1e-5, atol=1e-6)


def test_visual_query_trains_two_steps_and_roundtrips(tmp_path):
    base = tiny_llama(2)
    m = AdaptedLLaMA(base, vq_config(bias_scale=True))
    with torch.no_grad():
        m.adapter.gates.fill_(0.5)
    tokens, x = torch.randn(2, 5, 7), idx()
    opt = torch.optim.AdamW(param_groups(m, 0.0), lr=1e-2)
    before = m.adapter_visual.queries.detach().clone()
    for _ in range(2):  # a second step would fail if anything from the first graph were cached
        loss = m(x, ctx=m.prompt_state(visual=tokens)).logsumexp(-1).mean()
        loss.backward()
        assert m.adapter_visual.token_proj.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, m.adapter_visual.queries)
    with torch.no_grad():
        want = m(x, ctx=m.prompt_state(visual=tokens))
    save_adapter(m, tmp_path / "vq")
    fresh = load_adapter(tiny_llama(2), tmp_path / "vq")
    assert fresh.adapter_config == m.adapter_config
    with torch.no_grad():
        assert torch.equal(fresh(x, ctx=fresh.prompt_state(visual=tokens, precompute=True)), want)


def test_bad_visual_query_configs_name_the_option():
    base = tiny_llama(2)
    with pytest.raises(ValueError, match="drop visual_query_blocks or set an image encoder"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, visual_query_blocks=2))
    with pytest.raises(ValueError, match="visual_tokens set but visual_query_blocks=0.*drop them"):
        AdaptedLLaMA(base, AdapterConfig(adapter_len=2, adapter_layers=2, visual_dim=35, visual_tokens=5))
    with pytest.raises(ValueError, match="5 x 6 flattened features, but visual_dim=35"):
        AdaptedLLaMA(base, vq_config(visual_token_dim=6))
    with pytest.raises(ValueError, match="drop visual_hidden"):
        AdaptedLLaMA(base, vq_config(visual_hidden=8))
    with pytest.raises(ValueError, match="divisible by visual_query_heads"):
        AdaptedLLaMA(base, vq_config(visual_query_dim=18))
    m = AdaptedLLaMA(base, vq_config())
    with pytest.raises(ValueError, match="size 30, the adapter expects 35"):
        m.prompt_state(visual=torch.randn(2, 30))
