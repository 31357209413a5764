"""CLIP's visual transformer under the OpenAI key names (`visual.conv1.weight`, ...; open_clip uses
the same names), with the weights read from a local checkpoint.

- `clip-vit-b16`, `clip-vit-l14`: QuickGELU, OpenAI weights; `openclip-vit-b16`, `openclip-vit-l14`:
  GELU, LAION open_clip weights. Weights cannot be downloaded here: pass a local `.pt` (state dict
  or OpenAI TorchScript archive), `.bin` or `.safetensors`.
- `clip-tiny`: a 4-layer ViT with random (seeded) weights for tests.

Scales: the CLS token after layers L/4, L/2, 3L/4 and L, each through `ln_post` and `proj` (the
last one is exactly CLIP's image embedding). Patch tokens: CLS + patch tokens after the last layer
through `ln_post` and `proj`, as LLaMA-Adapter V2 reads CLIP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CACHE_VERSION, ImageEncoder
from .images import as_image, resize_center_crop, to_tensor
from .weights import check_state_dict, file_digest, read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    name: str
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    quick_gelu: bool = True  # OpenAI weights: x * sigmoid(1.702 x); open_clip LAION weights: GELU
    feature_layers: tuple[int, ...] | None = None  # 1-based; None = L/4, L/2, 3L/4, L

    @property
    def taps(self) -> tuple[int, ...]:
        if self.feature_layers:
            return self.feature_layers
        L = self.layers
        return tuple(sorted({max(1, round(L * q / 4)) for q in (1, 2, 3, 4)}))


CLIP_CONFIGS: dict[str, ClipVisionConfig] = {
    "clip-vit-b16": ClipVisionConfig("clip-vit-b16", 224, 16, 768, 12, 12, 4.0, 512),
    "clip-vit-l14": ClipVisionConfig("clip-vit-l14", 224, 14, 1024, 24, 16, 4.0, 768),
    "clip-tiny": ClipVisionConfig("clip-tiny", 32, 8, 64, 4, 4, 4.0, 32),
}
CLIP_CONFIGS["openclip-vit-b16"] = replace(CLIP_CONFIGS["clip-vit-b16"], name="openclip-vit-b16", quick_gelu=False)
CLIP_CONFIGS["openclip-vit-l14"] = replace(CLIP_CONFIGS["clip-vit-l14"], name="openclip-vit-l14", quick_gelu=False)


class _ClipAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight/bias, out_proj), batch-first sdpa."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = _QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ClipBlock(nn.Module):
    def __init__(self, c: ClipVisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.width)
        self.attn = _ClipAttention(c.width, c.heads)
        self.ln_2 = nn.LayerNorm(c.width)
        self.mlp = _ClipMLP(c.width, int(c.width * c.mlp_ratio), c.quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ClipTransformer(nn.Module):
    def __init__(self, c: ClipVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ClipBlock(c) for _ in range(c.layers))


class ClipVisionTransformer(nn.Module):
    """CLIP's `VisionTransformer` (OpenAI `model.visual`), same parameter names and shapes."""

    def __init__(self, c: ClipVisionConfig) -> None:
        super().__init__()
        self.config = c
        grid = c.image_size // c.patch_size
        self.conv1 = nn.Conv2d(3, c.width, c.patch_size, c.patch_size, bias=False)
        scale = c.width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(c.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, c.width))
        self.ln_pre = nn.LayerNorm(c.width)
        self.transformer = _ClipTransformer(c)
        self.ln_post = nn.LayerNorm(c.width)
        self.proj = nn.Parameter(scale * torch.randn(c.width, c.output_dim))
        for b in self.transformer.resblocks:
            nn.init.normal_(b.attn.in_proj_weight, std=scale)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid^2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """CLS + patch tokens after the last layer, through ln_post and proj: [B, 1 + grid^2, output_dim]
        (what V2 feeds its visual-query blocks)."""
        x = self._embed(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x) @ self.proj

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Projected CLS embeddings after each tap layer: list of [B, output_dim]."""
        x = self._embed(x)
        taps = set(self.config.taps)
        out = []
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if i in taps:
                out.append(self.ln_post(x[:, 0]) @ self.proj)
            if i >= max(taps):
                break
        return out


class ClipViTEncoder(ImageEncoder):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.image_size = config.image_size
        self.visual = ClipVisionTransformer(config)
        self.feature_dims = [config.output_dim] * len(config.taps)
        self._weights_id = "random"

    @property
    def cache_id(self) -> str:
        return f"{self.name}-{self._weights_id}-v{CACHE_VERSION}"

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        ims = [resize_center_crop(as_image(x), self.image_size) for x in images]
        return torch.stack([to_tensor(im, CLIP_MEAN, CLIP_STD) for im in ims])

    def _check_size(self, pixels: torch.Tensor) -> torch.Tensor:
        # The positional embedding fixes the grid: other sizes would fail deep inside with a shape error.
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.name} takes {self.image_size}x{self.image_size} pixels, got "
                f"{tuple(pixels.shape[-2:])}; use encoder.preprocess(images)"
            )
        return pixels

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.visual.features(self._check_size(pixels))

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual.tokens(self._check_size(pixels))

    @property
    def token_shape(self) -> tuple[int, int]:
        grid = self.image_size // self.config.patch_size
        return grid * grid + 1, self.config.output_dim

    def load_weights(self, path: str | os.PathLike[str]) -> ClipViTEncoder:
        """Load the visual tower from an OpenAI / open_clip checkpoint (full model or visual only)."""
        sd = clip_visual_state_dict(read_state_dict(path), str(path))
        check_state_dict(self, sd, str(path))
        self.load_state_dict(sd, strict=True)
        self._weights_id = file_digest(path)[:12]
        return self


def clip_visual_state_dict(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Keep the `visual.*` tensors of a full CLIP state dict; accept a visual-only one too."""
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not any(k.startswith("visual.") for k in sd) and "conv1.weight" in sd:
        sd = {f"visual.{k}": v for k, v in sd.items()}
    vis = {k: v.float() for k, v in sd.items() if k.startswith("visual.") and isinstance(v, torch.Tensor)}
    if not vis:
        hint = (
            " (this looks like a Hugging Face CLIPModel; convert it to open_clip/OpenAI names)"
            if any(k.startswith("vision_model.") for k in sd)
            else ""
        )
        raise ValueError(
            f"{where} holds no CLIP visual tower (no 'visual.*' tensors){hint}; pass an OpenAI or open_clip checkpoint"
        )
    return vis
