"""LLaMA-Adapter V2 (arXiv 2304.15010) and ImageBind-LLM (arXiv 2309.03905) extensions.

Everything here is switched on by `AdapterConfig` fields and applied by `AdaptedLLaMA` through
`apply_v2` / `remove_v2`, which take plain options: this module knows only `config` and `model`.
Every trainable tensor lives under a name part starting with "adapter", so the single predicate
`adapter.is_adapter_param` drives `requires_grad`, saving and optimiser groups for all of it
(all V2 tensors are 1-D, so `no_weight_decay` keeps them out of decay):

* `bias_scale`: every linear of every block (wq, wk, wv, wo, w1, w2, w3; V2 tunes all layers)
  becomes a `ScaledLinear`, `y = adapter_scale * (W x + adapter_bias)`, bias 0 and scale 1 at
  init (bit-identical outputs). The frozen `weight` keeps its name, so base checkpoints still load.
* `train_norms`: every RMSNorm of the base (2 per block + the final one) becomes an
  `AdapterRMSNorm` whose weight is a *copy* stored as `adapter_weight` (the base keeps its own
  weight; `remove_v2` restores it untouched).
* `bind_dim`: ImageBind-LLM's bind network maps a frozen modality embedding [B, bind_dim] to one
  token [B, dim], added to every token at every layer through the `Block.inject` seam with a
  zero-init per-layer gate: `h + tanh(adapter_bind_gate_l) * bind(feature)`.
* early fusion (`visual_layers`) lives in `AdaptedLLaMA.prompt_state`.
* `visual_query_blocks`: V2's visual-query blocks (`VisualQuery`) in place of the global-feature
  `VisualProjection`: `adapter_len` learnable queries attend to the frozen encoder's patch tokens
  through a few small pre-norm transformer blocks, and query i is added to prompt position i.

`fold_bias_scale` exports a plain LLaMA state dict with scale/bias/norms folded into the weights.

Limitation: unlike V1 prompts (which live in the wrapper), bias/scale, norm copies and bind gates
live in the base model's modules, so one base can carry only one V2/bind adapter at a time; a
second `AdaptedLLaMA` on the same base re-uses (V2 options on) or removes (off) them. Serving
several V2 adapters on one base needs a base copy each, or `fold_bias_scale` per adapter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .model import Block, LLaMA, Positions, RMSNorm

LINEAR_NAMES = (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))


class ScaledLinear(nn.Linear):
    """`y = adapter_scale * (W x + adapter_bias)` around a frozen nn.Linear (shares its weight).

    Bias/scale are fp32 master copies cast to the activation dtype, so they train well under a
    half-precision base; at init (+0, *1) the output is bit-identical to the wrapped linear.
    """

    @classmethod
    def wrap(cls, lin: nn.Linear) -> ScaledLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.register_parameter("bias", lin.bias)
        dev = lin.weight.device
        new.adapter_bias = nn.Parameter(torch.zeros(lin.out_features, device=dev))
        new.adapter_scale = nn.Parameter(torch.ones(lin.out_features, device=dev))
        return new

    def unwrap(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.register_parameter("bias", self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return (y + self.adapter_bias.to(y.dtype)) * self.adapter_scale.to(y.dtype)


class AdapterRMSNorm(RMSNorm):
    """RMSNorm whose (trainable) weight is registered as `adapter_weight`, a copy of the base's."""

    @classmethod
    def wrap(cls, norm: RMSNorm) -> AdapterRMSNorm:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.eps = norm.eps
        new.base_norm = [norm]  # a list: not registered, so the base weight is neither saved nor trained
        new.adapter_weight = nn.Parameter(norm.weight.detach().clone())
        return new

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.adapter_weight

    def unwrap(self) -> RMSNorm:
        return self.base_norm[0]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BindBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class BindNetwork(nn.Module):
    """ImageBind-LLM's bind network: Linear(E -> dim) then N x (RMSNorm + SwiGLU) residual blocks.

    Parameters: E*dim + dim (projection with bias) + N * (dim + 3*dim*hidden).
    """

    def __init__(self, in_dim: int, dim: int, n_blocks: int = 3, hidden: int = 0, eps: float = 1e-6) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(BindBlock(dim, hidden, eps) for _ in range(n_blocks))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)
        for b in self.blocks:
            x = b(x)
        return x


class QueryBlock(nn.Module):
    """A pre-norm ViT block (LayerNorm, multi-head self-attention with qkv bias, LayerNorm, GELU
    MLP x4), as the blocks V2 stacks over [queries; patch tokens]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: queries and patches see each other
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisualQuery(nn.Module):
    """LLaMA-Adapter V2's visual-query blocks: encoder tokens [B, N, d] -> prompts [B, K, dim].

    The frozen encoder's patch tokens are projected to the block width (+ LayerNorm, as V2's
    `clip_proj`/`clip_proj_norm`) and get a learnable position embedding (EfficientNet's flattened
    feature map has none of its own; for CLIP it is a harmless extra). K learnable queries are
    prepended, `n_blocks` self-attention blocks run over [queries; tokens], and the outputs at the
    query positions go through a projection + LayerNorm to the model width (V2's `visual_proj`,
    `visual_proj_norm`). Query i is added to adaption prompt i of every fused layer.
    """

    def __init__(
        self, n_tokens: int, token_dim: int, n_queries: int, dim: int, width: int = 0, n_blocks: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        width = width or dim
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.token_proj = nn.Linear(token_dim, width)
        self.token_norm = nn.LayerNorm(width)
        self.token_pos = nn.Parameter(torch.empty(n_tokens, width))
        self.queries = nn.Parameter(torch.empty(n_queries, width))
        self.blocks = nn.ModuleList(QueryBlock(width, heads) for _ in range(n_blocks))
        self.out_proj = nn.Linear(width, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.queries.is_meta:
            return
        # Small random queries/positions (ViT's 0.02): distinct queries from step 0 on, so the K
        # prompt positions do not all receive the same visual vector.
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.token_pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.token_norm(self.token_proj(tokens)) + self.token_pos.to(tokens.dtype)
        q = self.queries.to(t.dtype).expand(t.shape[0], -1, -1)
        x = torch.cat([q, t], dim=1)
        for b in self.blocks:
            x = b(x)
        return self.out_norm(self.out_proj(x[:, : q.shape[1]]))


class BindInjectBlock(Block):
    """A base Block (same modules, class swapped in place) whose `inject` adds the gated bind token.

    `adapter_bind_gate` (zero-init scalar) lives on the block, so the base model sees a trainable
    parameter in every layer and keeps autograd on from layer 0.
    """

    layer_idx: int

    def inject(self, x: torch.Tensor, at: Positions, ctx: Any) -> torch.Tensor:
        b = getattr(ctx, "bind", None)
        if b is None:
            return x
        g = torch.tanh(self.adapter_bind_gate).to(x.dtype)
        if at.packing is not None and b.shape[0] > 1:
            return x + g * b[at.example_of_token].to(x.dtype)  # each token gets its example's token
        return x + g * b[:, None, :].to(x.dtype)


def bind_blocks(model: LLaMA, on: bool) -> None:
    for i, blk in enumerate(model.layers):
        if on and not isinstance(blk, BindInjectBlock):
            blk.__class__ = BindInjectBlock
            blk.layer_idx = i
            blk.adapter_bind_gate = nn.Parameter(torch.zeros((), device=blk.attention.wo.weight.device))
        elif not on and isinstance(blk, BindInjectBlock):
            del blk.adapter_bind_gate
            blk.__class__ = Block


def _linears(model: LLaMA):
    for blk in model.layers:
        for sub, names in LINEAR_NAMES:
            parent = getattr(blk, sub)
            for n in names:
                if hasattr(parent, n):  # absent when fused for inference (wqkv, w13)
                    yield parent, n


def _norm_slots(model: LLaMA):
    for blk in model.layers:
        yield blk, "attention_norm"
        yield blk, "ffn_norm"
    yield model, "norm"


def apply_v2(model: LLaMA, *, bias_scale: bool, train_norms: bool, bind: bool) -> None:
    """Bring the base model's modules in line with the options (wrap what is asked, unwrap the rest)."""
    if bias_scale and any(hasattr(b.attention, "wqkv") or hasattr(b.feed_forward, "w13") for b in model.layers):
        raise ValueError("bias/scale tuning needs the separate q/k/v and gate/up projections; load the base unfused")
    for parent, n in _linears(model):
        lin = getattr(parent, n)
        if bias_scale and not isinstance(lin, ScaledLinear):
            setattr(parent, n, ScaledLinear.wrap(lin))
        elif not bias_scale and isinstance(lin, ScaledLinear):
            setattr(parent, n, lin.unwrap())
    for parent, n in _norm_slots(model):
        norm = getattr(parent, n)
        if train_norms and not isinstance(norm, AdapterRMSNorm):
            setattr(parent, n, AdapterRMSNorm.wrap(norm))
        elif not train_norms and isinstance(norm, AdapterRMSNorm):
            setattr(parent, n, norm.unwrap())
    bind_blocks(model, bind)


def remove_v2(model: LLaMA) -> None:
    apply_v2(model, bias_scale=False, train_norms=False, bind=False)


def fold_bias_scale(base: LLaMA, *, allow_bias: bool = False) -> dict[str, torch.Tensor]:
    """A plain-LLaMA state dict (this package's names, see checkpoint.py for HF names) with the V2
    scale/bias folded into the weights (W' = scale * W, b' = scale * b) and trained norm weights
    in place of the base ones. The adaption prompts / bind network are not part of it.

    LLaMA linears have no bias, so a non-zero bias can only be exported where the consumer has a
    place for it: HF `LlamaConfig(attention_bias=True, mlp_bias=True)` gives q/k/v/o_proj and
    gate/up/down_proj biases. Without `allow_bias` a non-zero bias raises; with it, the dict holds
    `...wq.bias` etc. for every linear (load with `folded_llama`).
    """
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in base.state_dict().items():
            if "adapter_" not in name:
                sd[name] = t.clone()
        for i, blk in enumerate(base.layers):
            for sub, names in LINEAR_NAMES:
                for n in names:
                    lin = getattr(getattr(blk, sub), n)
                    if not isinstance(lin, ScaledLinear):
                        continue
                    key = f"layers.{i}.{sub}.{n}"
                    w = lin.weight
                    dt = torch.promote_types(w.dtype, torch.float32)  # fold in (at least) fp32
                    s = lin.adapter_scale.to(dt)
                    sd[f"{key}.weight"] = (s[:, None] * w.to(dt)).to(w.dtype)
                    b = s * lin.adapter_bias.to(dt)
                    if lin.bias is not None:
                        b = b + s * lin.bias.to(dt)
                    if bool(b.any()):
                        if not allow_bias:
                            raise ValueError(
                                f"{key} has a non-zero bias, which a LLaMA linear cannot hold; pass "
                                "allow_bias=True and export with HF attention_bias/mlp_bias, or train "
                                "with bias_scale off"
                            )
                    if allow_bias:
                        sd[f"{key}.bias"] = b.to(w.dtype)
        for key, norm in _named_norms(base):
            if isinstance(norm, AdapterRMSNorm):
                sd[f"{key}.weight"] = norm.adapter_weight.detach().clone().to(norm.base_norm[0].weight.dtype)
    return sd


def _named_norms(model: LLaMA):
    for i, blk in enumerate(model.layers):
        yield f"layers.{i}.attention_norm", blk.attention_norm
        yield f"layers.{i}.ffn_norm", blk.ffn_norm
    yield "norm", model.norm


def folded_llama(config: Config, sd: dict[str, torch.Tensor]) -> LLaMA:
    """A plain LLaMA holding `fold_bias_scale`'s output (linears get biases where the dict has them)."""
    m = LLaMA(config).to(sd["tok_embeddings.weight"].dtype)
    for i, blk in enumerate(m.layers):
        for sub, names in LINEAR_NAMES:
            parent = getattr(blk, sub)
            for n in names:
                lin = getattr(parent, n)
                if f"layers.{i}.{sub}.{n}.bias" in sd:
                    new = nn.Linear(lin.in_features, lin.out_features, bias=True, dtype=lin.weight.dtype)
                    setattr(parent, n, new)
    m.load_state_dict(sd, strict=True)
    return m
