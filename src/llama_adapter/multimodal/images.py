"""Reading images: any file PIL opens -> RGB, with one-line errors for what is not an image, and the
two eval-time resize/crop transforms the encoders were trained with."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 100_000_000  # larger images are rejected (PIL decompression-bomb guard)


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


def as_image(x: Any) -> Image.Image:
    """A PIL image or a path -> RGB PIL image."""
    return to_rgb(x) if isinstance(x, Image.Image) else open_image(x)


def to_tensor(im: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32, scaled to [0, 1] then normalised per channel."""
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
