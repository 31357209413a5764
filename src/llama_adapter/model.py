"""A plain LLaMA decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, static KV cache.

Read it top to bottom. Adapters plug in through two seams and the base model imports nothing
from them: `Attention.attend` (how q, k, v become the attention output) and an opaque `ctx`
object that the model hands to every layer unchanged.

Conventions: rotary embeddings use the "rotate half" layout of Hugging Face checkpoints; Meta,
llama2.c and GGUF weights are permuted into it when loaded (see checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as the reference implementations do,
        # so half-precision results match them.
        # One fused op instead of six small ones: decoding is dominated by per-op overhead.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(config: Config, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3.1-style scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    s = config.rope_scaling
    if s:
        factor = s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions of any shape [...] -> [..., head_dim]."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B or 1, 1, T, hd], already in the weights' dtype (see `LLaMA.forward`)."""
    if cos.dtype != x.dtype:  # autocast: activations in a lower precision than the weights
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values of the sequence tokens of one layer: [B, n_kv_heads, max_len, hd].

    Row b's token at position p lives in slot p, so rows of different lengths share one cache
    without padding and a row can join or leave a running batch (see engine.py)."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        new = cls.__new__(cls)
        new.k, new.v = k, v
        return new

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, start: int, end: int) -> KVCache:
        """A view of rows start..end-1: writes through it land in this cache."""
        return KVCache.of(self.k[start:end], self.v[start:end])

    def update(
        self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, T, hd] at positions start.. (an int for every row, or a LongTensor [B]
        of per-row positions when T == 1) and return the first `kv_len` slots to attend over."""
        if isinstance(start, int):
            self.k[:, :, start : start + k.shape[2]] = k
            self.v[:, :, start : start + k.shape[2]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, start] = k[:, :, 0]
            self.v[rows, :, start] = v[:, :, 0]
        # Only the filled prefix: attention cost grows with the text, not with max_len.
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


@dataclass
class Packing:
    """Several examples per row (packed training): `spans[b]` lists the (start, end) token ranges
    of the examples in row b, in order; tokens after the last span are padding. Each example sees
    only itself (block-diagonal causal attention) and its RoPE positions restart at 0. Examples
    are numbered row by row (example j of the batch), the order per-example tensors such as
    image prompts follow."""

    spans: list[list[tuple[int, int]]]

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(row, start, end, example) for every example of the batch."""
        out, j = [], 0
        for b, row in enumerate(self.spans):
            for s, e in row:
                out.append((b, s, e, j))
                j += 1
        return out

    @property
    def n_examples(self) -> int:
        return sum(len(r) for r in self.spans)

    def pieces(self, row: int, T: int) -> tuple[list[int], list[bool]]:
        """Row `row` of T slots cut into consecutive pieces: their sizes, and which are examples
        (the others are padding)."""
        sizes, real, t = [], [], 0
        for s, e in self.spans[row]:
            if s > t:
                sizes.append(s - t)
                real.append(False)
            sizes.append(e - s)
            real.append(True)
            t = e
        if T > t:
            sizes.append(T - t)
            real.append(False)
        return sizes, real

    def positions(self, T: int, device: torch.device | str | None = None) -> torch.Tensor:
        pos = torch.zeros(len(self.spans), T, dtype=torch.long)
        for b, s, e, _ in self.segments():
            pos[b, s:e] = torch.arange(e - s)
        return pos.to(device)

    def example_of_token(self, T: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[B, T] example index of every token (padding: 0, whose result nobody reads)."""
        ex = torch.zeros(len(self.spans), T, dtype=torch.long)
        for b, s, e, j in self.segments():
            ex[b, s:e] = j
        return ex.to(device)


@dataclass
class Positions:
    """Where the tokens of one forward sit, computed once and handed to every layer: RoPE tables,
    the attention mask (None = plain causal), where K/V go in the cache, how many cached slots the
    queries read, and the example layout of a packed batch."""

    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    start: int | torch.Tensor
    kv_len: int
    packing: Packing | None = None
    example_of_token: torch.Tensor | None = None  # [B, T] with packing


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, at: Positions, cache: KVCache | None, ctx: Any) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *at.rope), apply_rope(k, *at.rope)
        if cache is not None:
            k, v = cache.update(at.start, k, v, at.kv_len)
        y = self.attend(q, k, v, at, ctx)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of x (one matmul once `fuse` has run)."""
        wqkv = getattr(self, "wqkv", None)
        if wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return wqkv(x).split([nq, nk, nk], dim=-1)

    def fuse(self) -> None:
        """Inference only: wq, wk and wv become one `wqkv` (one call and one pass over x per token, which
        is what the packed CPU kernels are bound by). The state dict then holds `wqkv`, so checkpoints are
        written before fusing, never after."""
        self.wqkv = fuse_linears([self.wq, self.wk, self.wv])
        del self.wq, self.wk, self.wv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: Positions, ctx: Any) -> torch.Tensor:
        """The adapter seam: q [B, H, T, hd], k/v [B, Hkv, S, hd] -> [B, H, T, hd]."""
        if at.packing is None:
            return sdpa(q, k, v, at.mask)
        # Block-diagonal causal attention, one example at a time: the work is sum(len^2) rather
        # than T^2 for a masked full row (9x slower on CPU at 2048 tokens), and no mask is built.
        # split + cat, not slice-assign: its backward is one concatenation, where a slice per
        # example made a zero-filled full-size gradient per example (examples x T work, 30% of a step).
        rows = []
        for b, (qb, kb, vb) in enumerate(zip(q.split(1), k.split(1), v.split(1))):
            sizes, real = at.packing.pieces(b, q.shape[2])
            parts = zip(qb.split(sizes, 2), kb.split(sizes, 2), vb.split(sizes, 2), real)
            rows.append(torch.cat([sdpa(x, y, z, None) if r else torch.zeros_like(x) for x, y, z, r in parts], 2))
        return torch.cat(rows)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = True
) -> torch.Tensor:
    """Scaled dot-product attention with GQA; `mask` (bool, True = attend) overrides `causal`."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None and causal and q.shape[2] == 1:
        causal = False  # one query at the end of the sequence sees every key
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal, enable_gqa=gqa)


class FeedForward(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = getattr(self, "w13", None)
        if w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def fuse(self) -> None:
        """Inference only: the gate and up projections (w1, w3) become one `w13` (see Attention.fuse)."""
        self.w13 = fuse_linears([self.w1, self.w3])
        del self.w1, self.w3


def fuse_linears(mods: list[nn.Module]) -> nn.Module:
    """One frozen linear computing `mods` side by side (outputs concatenated in order). Packed layers
    (quant.QuantLinear) bring their own `cat`; plain ones are concatenated here."""
    cat = getattr(type(mods[0]), "cat", None)
    if cat is not None and all(type(m) is type(mods[0]) for m in mods):
        return cat(mods)
    if not all(type(m) is nn.Linear and m.bias is None for m in mods):
        raise ValueError(f"cannot fuse {', '.join(type(m).__name__ for m in mods)}: mixed or wrapped layers")
    w = torch.cat([m.weight.detach() for m in mods])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    return out


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, at: Positions, cache: KVCache | None, ctx: Any) -> torch.Tensor:
        x = self.inject(x, at, ctx)
        h = x + self.attention(self.attention_norm(x), at, cache, ctx)
        return h + self.feed_forward(self.ffn_norm(h))

    def inject(self, x: torch.Tensor, at: Positions, ctx: Any) -> torch.Tensor:
        """Block-level seam (ImageBind-style additive injection); the base block adds nothing."""
        return x


class LLaMA(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype. Weights may be packed integers (quant.QuantLinear); the norms are
        always floating point in the precision the model computes in."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        c = self.config
        max_len = min(max_len or c.max_seq_len, c.max_seq_len)
        return [
            KVCache(batch, max_len, c.n_kv_heads, c.head_dim, dtype or self.dtype, self.device)
            for _ in range(c.n_layers)
        ]

    def forward(
        self,
        idx: torch.Tensor,
        *,
        start: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        ctx: Any = None,
        hidden_only: bool = False,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
        packing: Packing | None = None,
        grad_from: int | None = None,
        checkpoint_activations: bool = False,
    ) -> torch.Tensor:
        """idx [B, T] token ids at positions start..start+T-1 -> logits [B, T, vocab].

        start: an int shared by every row, or a LongTensor [B] of per-row positions for a one-token
        decode step (rows of different lengths in one batch; see engine.py). With a cache, K/V are
        written at those positions and the queries attend to every cached slot before them.
        hidden_only: return the final normalised hidden states instead of logits, so a trainer
        can project only the positions that carry a loss.
        last_only / keep: logits of the last position only, or of position keep[b] in row b
        ([B, 1, vocab]; prefill of right-padded prompts).
        packing: several examples per row (training; see `Packing`), without a cache.
        grad_from: first layer whose forward needs autograd (an adapter knows its lowest adapted
        layer); by default the first layer holding a trainable parameter. Layers below it run
        under no_grad, so no backward pass goes through the frozen bottom.
        checkpoint_activations: when training, keep only each block's input for the layers from
        `grad_from` up and recompute the block in the backward pass (less memory, one extra forward).
        """
        at = self.positions(idx, start, cache is not None, packing)
        x = self.tok_embeddings(idx)
        # Layers with nothing trainable below the first trainable one need no autograd graph.
        first = grad_from if grad_from is not None else self.first_trainable_layer()
        if self.tok_embeddings.weight.requires_grad:
            first = 0
        grad = torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            with torch.set_grad_enabled(grad and i >= first):
                c = None if cache is None else cache[i]
                if checkpoint_activations and grad and i >= first:
                    x = torch.utils.checkpoint.checkpoint(layer, x, at, c, ctx, use_reentrant=False)
                else:
                    x = layer(x, at, c, ctx)
        if keep is not None:
            x = x[torch.arange(x.shape[0], device=x.device), keep][:, None]
        elif last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if hidden_only else self.output(x)

    def positions(
        self, idx: torch.Tensor, start: int | torch.Tensor, cached: bool, packing: Packing | None = None
    ) -> Positions:
        B, T = idx.shape
        device = idx.device
        dtype = self.dtype
        if packing is not None:
            if cached or not isinstance(start, int) or start:
                raise ValueError("packed rows are for training: no cache and no start offset")
            if len(packing.spans) != B or any(e > T for row in packing.spans for _, e in row):
                raise ValueError(f"packing spans do not fit the batch [{B}, {T}]")
            rope = tuple(t[:, None].to(dtype) for t in rope_cos_sin(self.inv_freq, packing.positions(T, device)))
            return Positions(rope, None, 0, T, packing, packing.example_of_token(T, device))
        per_row = isinstance(start, torch.Tensor)
        if per_row and T != 1:
            raise ValueError(f"per-row start positions decode one token per row; got {T} tokens")
        if per_row and not bool((start != start[0]).any()):
            start, per_row = int(start[0]), False  # rows in step: plain slices, no mask, no scatter
        end = (int(start.max()) if per_row else start) + T
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens is longer than the model's context "
                f"({self.config.max_seq_len}); shorten the prompt or max_new_tokens"
            )
        mask = None
        if per_row:
            pos = start[:, None]
            # Each row sees the cached slots up to its own position; the rest belong to longer rows.
            mask = (torch.arange(end, device=device)[None, :] <= start[:, None])[:, None, None]
        else:
            pos = torch.arange(start, end, device=device)[None, :]
            if T > 1 and cached and start > 0:
                # SDPA's is_causal aligns the query block with the first key: wrong after a prefix.
                keys = torch.arange(end, device=device)
                mask = (keys[None, :] <= pos[0][:, None])[None, None]
        # Shaped and cast once here rather than in each of the 2 * n_layers `apply_rope` calls.
        rope = tuple(t[:, None].to(dtype) for t in rope_cos_sin(self.inv_freq, pos))
        return Positions(rope, mask, start, end)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up in every layer (inference; see Attention.fuse)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()

    def first_trainable_layer(self) -> int:
        if self.tok_embeddings.weight.requires_grad:
            return 0
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layers)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for tests and from-scratch models."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
