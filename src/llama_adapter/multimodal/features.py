"""From images to what an adapter takes: cached features per file, per training example, and per
inference call (from the encoder the adapter was trained with), plus the wiring into training.

Global features are `[feature_dim]` per image; a visual-query adapter (V2) takes the patch tokens
`[N, d]` flattened to `[N * d]` (`visual_dim = N * d`, see `visual_config`), so the same
`[B, visual_dim]` paths (cache with `tokens=True`, collate, generate, serve) carry both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..adapter import AdaptedLLaMA, AdapterConfig, PromptState
from .base import ImageEncoder
from .embeddings import EmbeddingCache
from .encoders import get_image_encoder


class FeatureCache(EmbeddingCache):
    """Precomputed concatenated image features, one `<sha256>.safetensors` per image under
    `dir/<encoder cache_id>/<sha[:2]>/`, written atomically; missing ones computed in batches.
    `tokens=True` caches patch tokens [N, d] instead (under `<cache_id>-tokens`)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        encoder: ImageEncoder,
        batch_size: int = 32,
        progress: bool = True,
        tokens: bool = False,
    ) -> None:
        self.encoder = encoder
        self.tokens = tokens
        super().__init__(
            directory,
            encoder.cache_id + ("-tokens" if tokens else ""),
            tuple(encoder.token_shape) if tokens else (encoder.feature_dim,),
            encoder.embed_tokens if tokens else encoder.embed,
            batch_size,
            progress,
            desc=f"encoding images ({encoder.name})",
            what="image",
        )


def example_visuals(
    examples: Sequence[dict[str, Any]],
    encoder: ImageEncoder,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    tokens: bool = False,
) -> list[torch.Tensor | None]:
    """Per-example flattened features ([feature_dim], or [N * d] patch tokens with `tokens`), None
    for rows without an image. Rows of the same image share one tensor, so a captions file with
    five captions per image, or a text dataset mixed in, costs no copies (a dense [rows, N * d]
    table of EfficientNet tokens would be 250 kB per row). With `cache_dir`, features are cached
    on disk by file hash."""
    idx = [i for i, ex in enumerate(examples) if ex.get("image")]
    out: list[torch.Tensor | None] = [None] * len(examples)
    if not idx:
        return out
    paths = [examples[i]["image"] for i in idx]
    if cache_dir is not None:
        rows = FeatureCache(cache_dir, encoder, batch_size, tokens=tokens).get_rows(paths)
    else:
        uniq = list(dict.fromkeys(str(p) for p in paths))
        enc = encoder.encode_token_images if tokens else encoder.encode_images
        feats = enc(uniq, batch_size)
        by_path = {p: feats[j] for j, p in enumerate(uniq)}
        rows = [by_path[str(p)] for p in paths]
    for i, f in zip(idx, rows):
        out[i] = f.reshape(-1)
    return out


def example_features(
    examples: Sequence[dict[str, Any]],
    encoder: ImageEncoder,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`example_visuals` as one dense table: ([N, feature_dim], has_image bool [N]); rows without
    an image get zeros and has_image False."""
    rows = example_visuals(examples, encoder, cache_dir, batch_size)
    feats = torch.zeros(len(examples), encoder.feature_dim)
    for i, f in enumerate(rows):
        if f is not None:
            feats[i] = f
    return feats, torch.tensor([f is not None for f in rows], dtype=torch.bool)


def uses_tokens(config: AdapterConfig) -> bool:
    """Whether an adapter config takes patch tokens (visual-query blocks) rather than global features."""
    return bool(getattr(config, "visual_query_blocks", 0))


def visual_config(encoder: ImageEncoder, name: str, tokens: bool = False) -> dict[str, Any]:
    """AdapterConfig fields describing what `encoder` feeds the adapter: global features, or
    (`tokens`, for visual-query blocks) N x d patch tokens passed flattened."""
    if not tokens:
        return {"visual_dim": encoder.feature_dim, "image_encoder": name}
    n, d = encoder.token_shape
    return {"visual_dim": n * d, "visual_tokens": n, "visual_token_dim": d, "image_encoder": name}


def visual_make_ctx(model: AdaptedLLaMA) -> Callable[[dict[str, torch.Tensor]], PromptState]:
    """`make_ctx` for train.fit: a batch carrying `visual` [B, F] and `has_image` [B] -> PromptState.
    A batch without `visual` (only text rows, e.g. joint image + text training) gets zero features
    with has_image False, which add exactly nothing but keep the visual module in the graph."""

    def make_ctx(batch: dict[str, torch.Tensor]) -> PromptState:
        if "visual" not in batch:
            B, dev = batch["input_ids"].shape[0], batch["input_ids"].device
            vis = torch.zeros(B, model.adapter_config.visual_dim, device=dev)
            return model.prompt_state(visual=vis, has_image=torch.zeros(B, dtype=torch.bool, device=dev))
        return model.prompt_state(visual=batch["visual"], has_image=batch["has_image"])

    return make_ctx


def image_features_for(
    model: nn.Module,
    images: Sequence[Any],
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """Features [B, visual_dim] for a multimodal adapter, from the encoder it was trained with
    (`adapter_config.image_encoder`). Entries may be paths or PIL images. For a visual-query
    adapter these are the flattened patch tokens [B, N * d]."""
    cfg = getattr(model, "adapter_config", None)
    if cfg is None or not cfg.visual_dim or not cfg.image_encoder:
        raise ValueError("images need a multimodal adapter (trained with --image-encoder); this one is text-only")
    p = next(model.parameters())
    enc = get_image_encoder(cfg.image_encoder, weights, str(p.device))
    tokens = uses_tokens(cfg)
    got = math.prod(enc.token_shape) if tokens else enc.feature_dim
    if got != cfg.visual_dim:
        raise ValueError(f"encoder {enc.name} gives {got} features, the adapter expects {cfg.visual_dim}")
    if cache_dir is not None and all(not isinstance(x, Image.Image) for x in images):
        return FeatureCache(cache_dir, enc, progress=False, tokens=tokens).get(images).flatten(1).to(p.device)
    if tokens:
        return enc.encode_token_images(list(images)).flatten(1).to(p.device)
    return enc.encode_images(list(images)).to(p.device)
