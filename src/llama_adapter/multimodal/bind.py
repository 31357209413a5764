"""Binding another modality to the image space, as ImageBind does (arXiv 2305.05665).

The image embeddings define the space (`EmbeddingSpace`); a small `BindProjection` maps a frozen
encoder's embeddings of another modality (audio today; video and point clouds share this path) into
it, trained with `train_bind_projection` (symmetric InfoNCE against the frozen image side).
`recall_at_k` measures the binding and `cache_enhance` is ImageBind-LLM's training-free visual
cache model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EmbeddingSpace:
    """The shared space every modality is bound to (ImageBind normalises its embeddings): features
    are z-scored per dimension with the *training images'* statistics (EfficientNet's multi-scale
    features differ in scale by stage and are all positive, so raw cosines are all close to 1),
    then put on the sphere of radius sqrt(d), i.e. RMS 1 per element, a scale the bind network's
    first linear layer handles well."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, feats: torch.Tensor) -> EmbeddingSpace:
        return cls(feats.mean(0), feats.std(0).clamp(min=1e-6))

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return to_sphere((feats - self.mean) / self.std)


def to_sphere(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm sqrt(d) (RMS 1 per element)."""
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class BindProjection(nn.Module):
    """Frozen embedding of another modality [B, in_dim] -> a point in the image `EmbeddingSpace`
    [B, out_dim]: z-score (statistics stored as buffers, set from the training inputs), a 2-layer
    MLP, projection onto the sphere. Only this trains; the modality's encoder stays frozen (ImageBind
    trains the whole audio encoder, which 900 pairs cannot support)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        # CLIP/ImageBind's learnable temperature, starting at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_sphere(self.net((x - self.in_mean) / self.in_std))


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs (row i of `a` belongs with row i of `b`), cosine
    similarities times exp(logit_scale)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * logit_scale.exp().clamp(max=100)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_bind_projection(
    source: torch.Tensor,
    image: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    hidden: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[BindProjection, list[float]]:
    """Bind a modality to the image space as ImageBind does: the image side is frozen (`image`
    already in the `EmbeddingSpace`), a `BindProjection` is trained on the pairs (source[i],
    image[i]) with symmetric InfoNCE, in-batch negatives. Returns the projection (eval mode) and the
    step losses. Everything random (init, batches, dropout) comes from `seed` alone: the global RNG
    is neither read nor advanced."""
    if source.shape[0] != image.shape[0] or source.shape[0] < 2:
        raise ValueError(f"need >= 2 aligned pairs, got {source.shape[0]} source and {image.shape[0]} image rows")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # all devices: manual_seed below seeds CUDA too
        torch.manual_seed(seed)  # the MLP's init and dropout masks: same seed, same projection
        proj = BindProjection(source.shape[1], image.shape[1], hidden, dropout)
        proj.in_mean.copy_(source.mean(0))
        proj.in_std.copy_(source.std(0).clamp(min=1e-6))
        opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        n = source.shape[0]
        bs = min(batch_size, n)
        proj.train()
        for step in range(steps):
            idx = torch.randperm(n, generator=g)[:bs]
            loss = info_nce(proj(source[idx]), image[idx], proj.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:  # cosine decay: the last steps settle instead of jumping
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.step()
            losses.append(loss.item())
    return proj.eval(), losses


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries whose own key (same row) is among the k most cosine-similar keys."""
    sim = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(1)  # keys strictly closer than the right one
    return {k: float((rank < k).float().mean()) for k in ks}


def cache_enhance(
    query: torch.Tensor, cache: torch.Tensor, k: int = 5, temperature: float = 100.0, alpha: float = 0.5
) -> torch.Tensor:
    """ImageBind-LLM's training-free visual cache model (official code: top 5, softmax of
    100 * cosine, alpha 0.5): mix each query with the similarity-weighted mean of its k nearest
    *image* embeddings from a cache (here the training images), pulling another modality's
    embedding toward where real images lie. Rows come back on the query's sphere."""
    q = F.normalize(query, dim=-1)
    c = F.normalize(cache, dim=-1)
    sims, idx = (q @ c.T).topk(min(k, c.shape[0]), dim=-1)
    w = (sims * temperature).softmax(-1)
    proto = F.normalize((w[..., None] * c[idx]).sum(-2), dim=-1)
    mixed = F.normalize(alpha * q + (1 - alpha) * proto, dim=-1)
    return mixed * query.norm(dim=-1, keepdim=True)
