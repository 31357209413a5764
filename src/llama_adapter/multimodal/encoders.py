"""Image encoders by name: `load_image_encoder("efficientnet-lite0")` and friends.

A new architecture is one module (like efficientnet.py or clip.py: an `ImageEncoder` subclass) plus
one entry in `_BUILDERS` below.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .base import ImageEncoder
from .clip import CLIP_CONFIGS, ClipViTEncoder
from .efficientnet import EfficientNetLite0Encoder

WeightsPath = str | os.PathLike[str] | None


def _efficientnet(name: str, weights: WeightsPath) -> ImageEncoder:
    return EfficientNetLite0Encoder().load_weights(weights)


def _clip(name: str, weights: WeightsPath) -> ImageEncoder:
    if name == "clip-tiny":  # random weights for tests, the same in every process
        # The CPU generator only (the module is built on the CPU), inside load_image_encoder's
        # fork_rng: the caller's random state, CUDA's included, is left as it was.
        torch.random.default_generator.manual_seed(0)
        enc = ClipViTEncoder(CLIP_CONFIGS[name])
        return enc if weights is None else enc.load_weights(weights)
    if weights is None:
        raise ValueError(
            f"{name} needs local weights: CLIP checkpoints cannot be downloaded here. Pass "
            f"--image-encoder-weights PATH (Python: weights=PATH) pointing to an OpenAI CLIP .pt "
            f"(e.g. ViT-B-16.pt) or an open_clip .bin/.safetensors; or use --image-encoder efficientnet-lite0"
        )
    return ClipViTEncoder(CLIP_CONFIGS[name]).load_weights(weights)


_BUILDERS: dict[str, Callable[[str, WeightsPath], ImageEncoder]] = {
    "efficientnet-lite0": _efficientnet,
    **dict.fromkeys(CLIP_CONFIGS, _clip),
}
ENCODER_NAMES = tuple(_BUILDERS)
_LOADED: dict[tuple[str, str | None, str], ImageEncoder] = {}


def load_image_encoder(
    name: str, weights: WeightsPath = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ImageEncoder:
    """A frozen encoder in eval mode. `efficientnet-lite0` loads the pip package's weights;
    CLIP encoders need `weights=` a local checkpoint; `clip-tiny` is random (seeded) for tests."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown image encoder {name!r}; choose one of: {', '.join(ENCODER_NAMES)}")
    # Built without advancing the global RNG: the random init is overwritten by the weights anyway,
    # and whether a run builds an encoder (say, only on a feature-cache miss) must not change the
    # random numbers drawn after it, such as the adapter's init.
    with torch.random.fork_rng(devices=[]):
        enc = _BUILDERS[name](name, weights)
    return enc.to(device=device, dtype=dtype).freeze()


def get_image_encoder(name: str, weights: WeightsPath = None, device: str = "cpu") -> ImageEncoder:
    """`load_image_encoder`, memoised per process (chat loops, servers)."""
    key = (name, None if weights is None else str(weights), device)
    if key not in _LOADED:
        _LOADED[key] = load_image_encoder(name, weights, device)
    return _LOADED[key]
