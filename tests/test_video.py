"""Video (multimodal/video.py): mp4/webm through PyAV, GIF through PIL, folders of frames; uniform
frame sampling, mean-pooled image features, and one-line errors for corrupt, empty or unreadable
clips. Clips are made here with a seed (moving shapes, a pan/zoom over a generated picture)."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from helpers import fuzz_file
from PIL import Image

from llama_adapter.multimodal import VideoEmbedder, embed_files, load_image_encoder, read_video
from llama_adapter.multimodal.video import (
    MAX_FRAME_SIDE,
    embed_video,
    pan_zoom_frames,
    synthetic_clip,
    uniform_indices,
    write_video,
)

try:
    import av  # noqa: F401

    HAS_AV = True
except ImportError:
    HAS_AV = False
needs_av = pytest.mark.skipif(not HAS_AV, reason="mp4/webm need PyAV: pip install av")


@pytest.fixture(scope="module")
def tiny_clip():
    return load_image_encoder("clip-tiny")


def numbered_frames(n: int, size: int = 32) -> list[Image.Image]:
    """Frame i is a flat grey of level 10 * i, so the sampled indices can be read back."""
    return [Image.new("RGB", (size, size), (10 * i,) * 3) for i in range(n)]


def levels(frames: list[Image.Image]) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 10) for f in frames]


def test_uniform_indices():
    assert uniform_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(3, 8) == [0, 1, 2]
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(0, 8) == []


@pytest.mark.parametrize(
    "suffix", ["gif", "", pytest.param("mp4", marks=needs_av), pytest.param("webm", marks=needs_av)]
)
def test_every_container_gives_the_same_sampled_frames(tmp_path, suffix):
    path = write_video(numbered_frames(16), tmp_path / (f"clip.{suffix}" if suffix else "frames"))
    got = read_video(path, k=4)
    assert len(got) == 4 and all(f.mode == "RGB" for f in got)
    assert levels(got) == [2, 6, 10, 14]  # lossy codecs keep flat greys within a level
    if suffix:  # the same clip sent as bytes (as an API client does)
        assert levels(read_video(path.read_bytes(), suffix, k=4)) == [2, 6, 10, 14]


def test_large_frames_are_shrunk(tmp_path):
    big = [Image.new("RGB", (2000, 1000), (i * 40, 0, 0)) for i in range(3)]
    got = read_video(write_video(big, tmp_path / "big.gif"))
    assert max(got[0].size) == MAX_FRAME_SIDE


def test_bad_clips_are_one_line_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk.gif").write_bytes(b"GIF89a" + b"\x00" * 10)
    cases = {
        tmp_path / "missing.mp4": "not found",
        tmp_path / "empty_dir": "holds no frames",
        tmp_path / "junk.gif": "not a readable GIF",
    }
    for src, needle in cases.items():
        with pytest.raises(ValueError, match=needle) as e:
            read_video(src)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not supported"):
        read_video(b"data", "flv")


@needs_av
def test_corrupt_and_frameless_videos(tmp_path):
    good = write_video(synthetic_clip("circle", "red", 12, seed=1), tmp_path / "a.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 50)
    (tmp_path / "zero.mp4").write_bytes(b"")
    for p in ("junk.mp4", "zero.mp4"):
        with pytest.raises(ValueError, match="not a readable video") as e:
            read_video(tmp_path / p)
        assert "\n" not in str(e.value)
    # Valid containers without a single video frame: a video stream that got none, audio only.
    with av.open(str(tmp_path / "none.mp4"), mode="w") as box:
        s = box.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        box.start_encoding()
    with av.open(str(tmp_path / "audio.mp4"), mode="w") as box:
        box.add_stream("aac", rate=8000)
        box.start_encoding()
    for p in ("none.mp4", "audio.mp4"):
        with pytest.raises(ValueError, match="no frames|no video stream"):
            read_video(tmp_path / p)
    # Truncated and byte-flipped copies: each loads or is one line, in bounded time.
    counts = fuzz_file(good, lambda: read_video(good), cuts=12, flips=12, limit_s=20)
    assert counts["refused"] > 0


def test_missing_pyav_is_one_line(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_av(name, *a, **kw):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real(name, *a, **kw)

    (tmp_path / "x.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ValueError, match="pip install av"):
        read_video(tmp_path / "x.mp4")
    assert len(read_video(write_video(numbered_frames(3), tmp_path / "ok.gif"))) == 3  # GIF needs no PyAV


def test_a_clip_is_the_mean_of_its_frames_features(tiny_clip, tmp_path):
    frames = pan_zoom_frames(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)), 6)
    per_frame = tiny_clip.embed(frames)
    torch.testing.assert_close(embed_video(tiny_clip, frames), per_frame.mean(0))
    one = [frames[0]] * 3  # a still clip is its image
    torch.testing.assert_close(embed_video(tiny_clip, one), tiny_clip.embed(one[:1])[0], atol=1e-5, rtol=1e-5)
    # The Embedder path (files, cache) gives the same numbers as the frames read back.
    path = write_video(frames, tmp_path / "c.gif")
    emb = VideoEmbedder(tiny_clip)
    cached = embed_files(emb, [path, path], tmp_path / "cache", progress=False)
    torch.testing.assert_close(cached[0], embed_video(tiny_clip, read_video(path)))
    assert (tmp_path / "cache" / emb.cache_id).is_dir() and emb.cache_id.endswith("video8")


def test_synthetic_clips_are_seeded_and_move():
    a, b = synthetic_clip("square", "blue", 5, seed=3), synthetic_clip("square", "blue", 5, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[-1]))
