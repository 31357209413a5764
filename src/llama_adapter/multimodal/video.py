"""Video as ImageBind takes it: a few frames sampled uniformly over the clip, each encoded by the
frozen *image* encoder, the per-frame features mean-pooled into one image-space vector. From there a
clip takes exactly the path an image takes (the adapter's visual projection or bind network), so an
adapter trained on images alone reads video.

Readers (one per container kind, all returning at most `VIDEO_FRAMES` RGB frames):
* mp4 / webm / mkv / mov / avi through PyAV (`pip install av`: a wheel that ships its own FFmpeg
  libraries, no system ffmpeg), imported only when such a file is read;
* animated GIF through PIL (always installed);
* a folder of frames (`*.png`, `*.jpg`, ... sorted by name).

Bounded work: frames are counted from the container's packets (no decoding) and only the sampled ones
are kept, shrunk to `MAX_FRAME_SIDE`; a clip of more than `MAX_VIDEO_FRAMES` frames is refused (trim it
first), so a long or hostile file costs seconds, not minutes. `synthetic_clip` / `pan_zoom_frames` /
`write_video` make the seeded test clips used by the tests and examples/video_points.py.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .base import ImageEncoder
from .images import MAX_IMAGE_PIXELS, open_image, to_rgb

VIDEO_FRAMES = 8  # frames per clip; ImageBind samples a handful (2 per 2 s clip, several clips)
MAX_VIDEO_FRAMES = 20_000  # about 11 minutes at 30 fps
MAX_FRAME_SIDE = 512  # sampled frames are shrunk to this (the encoders take 224)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AV_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
VIDEO_FORMATS = ("mp4", "webm", "gif", "mkv", "mov", "avi")  # what an API client may name


def uniform_indices(n: int, k: int) -> list[int]:
    """k frame indices spread evenly over n frames (the centre of each of k equal segments, as
    ImageBind's/TSN's uniform sampling); all n when n <= k."""
    if n <= k:
        return list(range(n))
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


def _shrink(im: Image.Image) -> Image.Image:
    im = to_rgb(im)
    if max(im.size) > MAX_FRAME_SIDE:
        im.thumbnail((MAX_FRAME_SIDE, MAX_FRAME_SIDE), Image.BILINEAR)
    return im


def _need_av() -> Any:
    try:
        import av  # optional (pip install av): only mp4/webm video needs it
    except ImportError as e:
        raise ValueError("reading mp4/webm video needs PyAV: pip install av (it ships its own FFmpeg)") from e
    return av


def _read_av(src: str | io.BytesIO, name: str, k: int) -> list[Image.Image]:
    av = _need_av()
    try:
        with av.open(src, mode="r") as box:
            if not box.streams.video:
                raise ValueError(f"{name} has no video stream")
            stream = box.streams.video[0]
            n = sum(1 for p in box.demux(stream) if p.size)  # packets, not decoded frames: cheap
            if n > MAX_VIDEO_FRAMES:
                raise ValueError(f"{name} has {n} frames, over the {MAX_VIDEO_FRAMES}-frame limit; trim it first")
            box.seek(0)
            want, out = set(uniform_indices(n, k)), []
            for i, frame in enumerate(box.decode(stream)):
                if i in want:
                    out.append(_shrink(frame.to_image()))
                if len(out) == len(want):
                    break
    except av.FFmpegError as e:  # covers invalid data, truncated files, unknown containers
        why = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{name} is not a readable video ({type(e).__name__}: {why})") from e
    return out


def _read_gif(src: str | io.BytesIO, name: str, k: int) -> list[Image.Image]:
    try:
        with Image.open(src) as im:
            n = getattr(im, "n_frames", 1)
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS or n > MAX_VIDEO_FRAMES:
                raise ValueError(f"{name} is {im.size[0]}x{im.size[1]} with {n} frames: too large; shrink it first")
            out = []
            for i in uniform_indices(n, k):
                im.seek(i)
                out.append(_shrink(im.convert("RGB")))
    except (OSError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError) as e:
        # PIL reports a truncated GIF as any of these
        raise ValueError(f"{name} is not a readable GIF ({type(e).__name__}: {e})") from e
    return out


def _read_folder(d: Path, k: int) -> list[Image.Image]:
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise ValueError(f"video folder {d} holds no frames ({', '.join(FRAME_SUFFIXES)} files)")
    if len(files) > MAX_VIDEO_FRAMES:
        raise ValueError(f"video folder {d} holds {len(files)} frames, over the {MAX_VIDEO_FRAMES}-frame limit")
    return [_shrink(open_image(files[i])) for i in uniform_indices(len(files), k)]


def read_video(src: str | os.PathLike[str] | bytes, fmt: str | None = None, k: int = VIDEO_FRAMES) -> list[Image.Image]:
    """A clip -> k RGB frames sampled uniformly (fewer if the clip is shorter). `src` is a video
    file, a folder of frames, or the file's bytes with `fmt` ("mp4", "webm", "gif", ...). Raises
    ValueError naming the clip for anything unreadable or empty."""
    if isinstance(src, bytes):
        fmt = (fmt or "").lower().lstrip(".")
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"video format {fmt!r} is not supported; use one of {', '.join(VIDEO_FORMATS)}")
        name, data = f"the {fmt} video", io.BytesIO(src)
        frames = _read_gif(data, name, k) if fmt == "gif" else _read_av(data, name, k)
    else:
        p = Path(src)
        name = f"video {p}"
        if p.is_dir():
            frames = _read_folder(p, k)
        elif not p.is_file():
            raise ValueError(f"video {p} not found; check the path")
        elif p.suffix.lower() == ".gif":
            frames = _read_gif(str(p), name, k)
        else:
            frames = _read_av(str(p), name, k)
    if not frames:
        raise ValueError(f"{name} has no frames")
    return frames


def embed_video(encoder: ImageEncoder, frames: Sequence[Any], tokens: bool = False) -> torch.Tensor:
    """One clip's frames (PIL images or paths) -> the mean of their image features [feature_dim]
    (or of their patch tokens, flattened, for visual-query adapters)."""
    f = encoder.embed_tokens(frames).flatten(1) if tokens else encoder.embed(frames)
    return f.mean(0)


class VideoEmbedder:
    """An `embeddings.Embedder` for video files: frames sampled by `read_video`, image features
    mean-pooled. Its cache id names the image encoder and the frame count."""

    def __init__(self, encoder: ImageEncoder, frames: int = VIDEO_FRAMES) -> None:
        self.encoder, self.frames = encoder, frames
        self.name = f"video/{encoder.name}"

    @property
    def cache_id(self) -> str:
        return f"{self.encoder.cache_id}-video{self.frames}"

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def embed(self, items: Sequence[Any]) -> torch.Tensor:
        """Video paths (or lists of frames) -> [len(items), feature_dim]."""
        clips = [x if isinstance(x, list) else read_video(x, k=self.frames) for x in items]
        if not clips:
            return torch.zeros(0, self.feature_dim)
        return torch.stack([embed_video(self.encoder, c) for c in clips])


# ---------------------------------------------------------------------------------------- test clips
def pan_zoom_frames(photo: Image.Image, n: int = 16, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """A slow camera move over one photo (the clip shows what the photo shows, so its caption is
    known): a crop of 60-80% of the short side that drifts and zooms along a seeded random path."""
    rng = np.random.default_rng(seed)
    w, h = photo.size
    side = min(w, h)
    s0, s1 = rng.uniform(0.6, 0.8, 2) * side
    (x0, y0), (x1, y1) = (rng.uniform(0, 1, 2) for _ in range(2))
    out = []
    for i in range(n):
        t = i / max(1, n - 1)
        s = s0 + (s1 - s0) * t
        cx = (x0 + (x1 - x0) * t) * (w - s) + s / 2
        cy = (y0 + (y1 - y0) * t) * (h - s) + s / 2
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        out.append(photo.resize((size, size), Image.BICUBIC, box=box))
    return out


SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}


def synthetic_clip(shape: str, colour: str, n: int = 16, size: int = 128, seed: int = 0) -> list[Image.Image]:
    """A coloured circle, square or triangle moving in a straight line across a plain background."""
    rng = np.random.default_rng(seed)
    r = size * rng.uniform(0.12, 0.2)
    (x0, y0), (x1, y1) = (rng.uniform(r, size - r, 2) for _ in range(2))
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    out = []
    for i in range(n):
        t = i / max(1, n - 1)
        cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        fill = SHAPE_COLOURS[colour]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            a = [math.radians(90 + 120 * j) + t for j in range(3)]
            d.polygon([(cx + r * math.cos(x), cy - r * math.sin(x)) for x in a], fill=fill)
        out.append(im)
    return out


def write_video(frames: Sequence[Image.Image], path: str | os.PathLike[str], fps: int = 8) -> Path:
    """Frames -> a clip: `.gif` with PIL; `.mp4` (H.264 or MPEG-4) / `.webm` (VP9) with PyAV;
    a path without a suffix becomes a folder of numbered PNGs."""
    p = Path(path)
    if not frames:
        raise ValueError("write_video needs at least one frame")
    if p.suffix == "":
        p.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            f.save(p / f"{i:05d}.png")
        return p
    if p.suffix.lower() == ".gif":
        frames[0].save(p, save_all=True, append_images=list(frames[1:]), duration=1000 // fps, loop=0)
        return p
    av = _need_av()
    codec = {".webm": "libvpx-vp9"}.get(p.suffix.lower(), "libx264" if "libx264" in av.codecs_available else "mpeg4")
    w, h = (frames[0].size[0] // 2) * 2, (frames[0].size[1] // 2) * 2  # yuv420p needs even sides
    with av.open(str(p), mode="w") as box:
        stream = box.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_image(f.convert("RGB").resize((w, h)))
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return p
