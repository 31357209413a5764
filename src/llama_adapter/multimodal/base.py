"""The image encoder interface every architecture implements (efficientnet.py, clip.py).

A frozen encoder turns an image into several global feature vectors taken at different depths
("multi-scale"); they are concatenated to `[B, sum(feature_dims)]`, which is what a V1 adapter's
projection takes. `encode_tokens` gives patch tokens `[B, N, d]` for V2's visual-query blocks.
An `ImageEncoder` is also an `embeddings.Embedder` (`embed`), so images are cached and bound like
any other modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .embeddings import in_batches

CACHE_VERSION = 1  # bump when preprocessing or feature definitions change


class ImageEncoder(nn.Module):
    """A frozen image encoder: `preprocess` PIL images, `encode` to per-scale global features.

    Subclasses set `name`, `feature_dims` and `image_size` and implement `preprocess` and
    `forward_features` (and, if they give patch tokens, `forward_tokens` and `token_shape`)."""

    name: str
    feature_dims: list[int]
    image_size: int

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images or paths -> [B, 3, H, W] float32, normalised for this encoder."""
        raise NotImplementedError

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"encoder {self.name} gives no patch tokens; drop visual_query_blocks or use another encoder")

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, d): tokens per image and their width, as `encode_tokens` returns them."""
        raise ValueError(f"encoder {self.name} gives no patch tokens; drop visual_query_blocks or use another encoder")

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    @property
    def cache_id(self) -> str:
        """Identity for feature caches: changes when weights or preprocessing change."""
        return f"{self.name}-v{CACHE_VERSION}"

    def freeze(self) -> ImageEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)  # always eval: BN statistics and dropout stay frozen

    def _like_weights(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return pixels.to(p.device, p.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> list of [B, d_i] float32 (frozen, eval, no grad)."""
        return [f.float() for f in self.forward_features(self._like_weights(pixels))]

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch tokens [B, N, d] float32 (frozen, eval, no grad)."""
        return self.forward_tokens(self._like_weights(pixels)).float()

    def encode_concat(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(pixels), dim=-1)

    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """One batch of PIL images or paths -> [B, feature_dim] (the `Embedder` interface)."""
        return self.encode_concat(self.preprocess(images))

    def embed_tokens(self, images: Sequence[Any]) -> torch.Tensor:
        """One batch of PIL images or paths -> patch tokens [B, N, d]."""
        return self.encode_tokens(self.preprocess(images))

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """PIL images or paths -> [B, feature_dim] (CPU float32)."""
        out = [self.embed(chunk).cpu() for chunk in in_batches(images, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)

    def encode_token_images(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """PIL images or paths -> [B, N, d] (CPU float32)."""
        out = [self.embed_tokens(chunk).cpu() for chunk in in_batches(images, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, *self.token_shape)
