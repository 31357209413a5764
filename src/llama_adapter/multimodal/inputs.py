"""One row's non-text input, whatever its modality: the `Input` every front end builds (CLI flags and
JSONL rows, chat's /image /audio /video /points, the API's content parts) and every adapter's
`ModalitySet` encodes.

An `Input` is read and checked where it enters (`read_input` from a file, `decode_input` from bytes
an API client sent), so a bad file is a one-line ValueError before any model work, and what reaches
the encoders is always a decoded value:

    image   PIL RGB image                 images.open_image
    audio   mono waveform [N] at 44.1 kHz  audio.decode_audio
    video   list of sampled RGB frames    video.read_video
    points  float32 [N, 6] x y z r g b     points.read_points
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .audio import AUDIO_FORMATS, decode_audio
from .images import MAX_IMAGE_PIXELS, open_image, to_rgb
from .points import POINT_FORMATS, read_points
from .video import VIDEO_FORMATS, read_video

MODALITIES = ("image", "audio", "video", "points")
NONE_WORDS = ("none", "-")  # a CLI/JSONL row without that input
FORMATS = {"audio": AUDIO_FORMATS, "video": VIDEO_FORMATS, "points": POINT_FORMATS}


@dataclass(frozen=True, eq=False)
class Input:
    """A decoded input of one modality (see the module docstring) and where it came from."""

    modality: str
    data: Any
    source: str = ""  # a path or "<mp3 data>", for messages and output tags

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; choose one of {', '.join(MODALITIES)}")

    @property
    def label(self) -> str:
        return f"{self.modality} {self.source}".strip()


def image_from_bytes(data: bytes) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) -> RGB, with the pixel limit of `open_image`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {im.size[0]}x{im.size[1]} pixels; downscale it")
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"could not decode the image ({type(e).__name__}: {e})") from e


def read_input(modality: str, path: str | os.PathLike[str]) -> Input:
    """A file (a folder of frames for video) -> a checked `Input`; ValueError naming the file."""
    src = str(path)
    if modality == "image":
        return Input("image", open_image(path), src)
    if modality == "audio":
        return Input("audio", decode_audio(path), src)
    if modality == "video":
        return Input("video", read_video(path), src)
    if modality == "points":
        return Input("points", read_points(path), src)
    raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")


def decode_input(modality: str, data: bytes, fmt: str | None = None) -> Input:
    """Bytes of a file (as an API client sends them) -> a checked `Input`; `fmt` names the file
    type for audio (mp3, wav, ...), video (mp4, webm, gif) and points (ply, npy, xyz)."""
    if modality == "image":
        return Input("image", image_from_bytes(data), "<image data>")
    source = f"<{fmt} data>"
    if modality == "audio":
        return Input("audio", decode_audio(data, fmt=fmt), source)
    if modality == "video":
        return Input("video", read_video(data, fmt), source)
    if modality == "points":
        return Input("points", read_points(data, fmt), source)
    raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")


def as_input(x: Any) -> Input | None:
    """None, an `Input`, or (as callers that know only images pass) an image path / PIL image."""
    if x is None or isinstance(x, Input):
        return x
    if isinstance(x, Image.Image):
        return Input("image", to_rgb(x), "<image>")
    if isinstance(x, str | os.PathLike):
        return read_input("image", Path(x))
    raise ValueError(f"expected an Input, an image path or a PIL image, got {type(x).__name__}")
