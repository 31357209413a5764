"""Point clouds (multimodal/points.py, shapes.py): the .ply (ascii, binary little endian), .npy and
.xyz readers, their one-line errors (NaN/Inf, wrong columns, no points, truncated, damaged), the
documented subsample of huge clouds in bounded time, and the PointNet encoder bound with InfoNCE."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import fuzz_file

from llama_adapter.multimodal import MAX_POINTS, PointEncoder, normalize_cloud, read_points, train_binding
from llama_adapter.multimodal.bind import recall_at_k
from llama_adapter.multimodal.shapes import SHAPES, random_shape, render, sample_cloud

pytestmark = pytest.mark.usefixtures("one_thread")

XYZRGB = np.array([[0.0, 1.0, 2.0, 255, 0, 0], [1.5, -1.0, 0.5, 0, 128, 255], [3.0, 3.0, 3.0, 10, 20, 30]])


def ply(path, a: np.ndarray, fmt: str = "binary_little_endian", extra: str = "", colour: bool = True):
    props = "property float x\nproperty float y\nproperty float z\n"
    if colour:
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    head = f"ply\nformat {fmt} 1.0\ncomment made by a test\nelement vertex {len(a)}\n{props}{extra}end_header\n"
    if fmt == "ascii":
        body = "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in a).encode()
    else:
        dt = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("r", "u1"), ("g", "u1"), ("b", "u1")] if colour else [])
        rec = np.zeros(len(a), dtype=dt)
        for i, (name, _) in enumerate(dt):
            rec[name] = a[:, i]
        body = rec.tobytes()
    path.write_bytes(head.encode() + body)
    return path


def expected(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.float32).copy()
    out[:, 3:] /= 255.0
    return out


@pytest.mark.parametrize("kind", ["ply-binary", "ply-ascii", "npy", "xyz"])
def test_every_format_reads_the_same_cloud(tmp_path, kind):
    if kind.startswith("ply"):
        p = ply(tmp_path / "c.ply", XYZRGB, "ascii" if kind == "ply-ascii" else "binary_little_endian")
    elif kind == "npy":
        np.save(p := tmp_path / "c.npy", XYZRGB)
    else:
        np.savetxt(p := tmp_path / "c.xyz", XYZRGB)
    got = read_points(p)
    assert got.dtype == torch.float32 and got.shape == (3, 6)
    np.testing.assert_allclose(got.numpy(), expected(XYZRGB), atol=1e-6)
    np.testing.assert_allclose(read_points(p.read_bytes(), p.suffix).numpy(), got.numpy())  # as an API client sends it


def test_no_colour_is_grey_and_unit_colours_stay(tmp_path):
    np.save(tmp_path / "a.npy", XYZRGB[:, :3])
    assert (read_points(tmp_path / "a.npy")[:, 3:] == 0.5).all()
    unit = XYZRGB.copy()
    unit[:, 3:] /= 255
    np.savetxt(tmp_path / "u.xyz", unit)
    np.testing.assert_allclose(read_points(tmp_path / "u.xyz").numpy(), expected(XYZRGB), atol=1e-5)
    p = ply(tmp_path / "g.ply", XYZRGB[:, :3], colour=False, extra="property float nx\n".replace("nx", "intensity"))
    # an extra property the header declares but the rows lack is caught; with data it is ignored
    with pytest.raises(ValueError):
        read_points(p)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: np.save(d / "x.npy", np.array([[0, 0, np.nan], [1, 1, 1.0]])) or d / "x.npy", "NaN or Inf"),
        (lambda d: np.save(d / "x.npy", np.array([[0, 0, np.inf]])) or d / "x.npy", "NaN or Inf"),
        (lambda d: (d / "x.xyz").write_text("1 2 3\n4 5 inf\n") and d / "x.xyz", "NaN or Inf"),
        (lambda d: np.save(d / "x.npy", np.zeros((5, 4))) or d / "x.npy", "5x4 array"),
        (lambda d: np.save(d / "x.npy", np.zeros((5,))) or d / "x.npy", "expected N x 3"),
        (lambda d: np.save(d / "x.npy", np.zeros((0, 3))) or d / "x.npy", "0 points"),
        (lambda d: (d / "x.xyz").write_text("") or d / "x.xyz", "0 points"),
        (lambda d: (d / "x.xyz").write_text("1 2 3\n4 5\n") and d / "x.xyz", "columns"),
        (lambda d: (d / "x.xyz").write_text("1 2 3 4\n") and d / "x.xyz", "1x4 array"),
        (lambda d: (d / "x.xyz").write_text("a b c\n") and d / "x.xyz", "not numbers"),
        (lambda d: ply(d / "x.ply", XYZRGB[:0]), "0 points"),
        (lambda d: ply(d / "x.ply", XYZRGB, "binary_big_endian"), "not supported"),
        (lambda d: (d / "x.ply").write_bytes(ply(d / "y.ply", XYZRGB).read_bytes()[:-5]) and d / "x.ply", "truncated"),
        (lambda d: (d / "x.ply").write_text("hello\n") and d / "x.ply", "not a PLY"),
        (lambda d: np.save(d / "x.npy", np.array(["a", "b"])) or d / "x.npy", "numeric"),
        (lambda d: (d / "x.npy").write_bytes(b"\x93NUMPY garbage") and d / "x.npy", "not a readable"),
        (lambda d: np.save(d / "x.npy", np.full((2, 6), 300.0)) or d / "x.npy", "colour values"),
        (lambda d: (d / "x.pcd").write_text("1 2 3") and d / "x.pcd", "not supported"),
        (lambda d: d / "missing.ply", "not found"),
    ],
)
def test_bad_clouds_are_one_line_errors(tmp_path, make, needle):
    with pytest.raises(ValueError, match=needle) as e:
        read_points(make(tmp_path))
    assert "\n" not in str(e.value)


def test_damaged_files_load_or_refuse_in_bounded_time(tmp_path):
    cloud = sample_cloud(random_shape(0), 300)[0].numpy()
    cloud[:, 3:] *= 255
    files = [ply(tmp_path / "b.ply", cloud), ply(tmp_path / "a.ply", cloud, "ascii"), tmp_path / "c.npy"]
    np.save(files[2], cloud)
    for f in files:
        fuzz_file(f, lambda f=f: read_points(f), cuts=10, flips=10, limit_s=10)


def test_ten_million_points_are_subsampled_in_bounded_time_and_memory(tmp_path):
    n = 10_000_000
    rng = np.random.default_rng(0)
    xyz = rng.standard_normal((n, 3), dtype=np.float32)
    big_ply = tmp_path / "big.ply"
    head = f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\nproperty float y\n"
    big_ply.write_bytes(head.encode() + b"property float z\nend_header\n" + xyz.tobytes())
    np.save(tmp_path / "big.npy", xyz)
    for p in (big_ply, tmp_path / "big.npy"):
        t = time.perf_counter()
        got = read_points(p)
        assert got.shape == (MAX_POINTS, 6) and time.perf_counter() - t < 10
        # the documented subsample: MAX_POINTS rows chosen with seed 0, the same every time
        keep = np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))
        np.testing.assert_array_equal(got[:, :3].numpy(), xyz[keep])
    # text is parsed line by line, only the kept lines converted
    (tmp_path / "big.xyz").write_bytes(b"0.5 1.5 -2.0\n" * 2_000_000)
    t = time.perf_counter()
    got = read_points(tmp_path / "big.xyz")
    assert got.shape == (MAX_POINTS, 6) and time.perf_counter() - t < 30
    assert (got[:, :3] == torch.tensor([0.5, 1.5, -2.0])).all()


def test_normalize_cloud_and_encoder_invariances():
    cloud = sample_cloud(random_shape(1), 500)[0]
    x = normalize_cloud(cloud, 256)
    assert x.shape == (256, 6) and x[:, :3].norm(dim=1).max() <= 1 + 1e-5
    assert torch.equal(x, normalize_cloud(cloud, 256))  # seeded sampling
    big = cloud.clone()
    big[:, :3] = big[:, :3] * 7 + 3  # moved and scaled: the same object to the encoder
    torch.testing.assert_close(normalize_cloud(big, 256), x, atol=1e-5, rtol=1e-4)
    assert normalize_cloud(cloud[:10], 64).shape == (64, 6)  # fewer points than wanted: drawn with replacement
    torch.manual_seed(0)
    enc = PointEncoder(40, (8, 16), 16, points=64).eval()
    batch = enc.prepare([cloud, cloud[:50]])
    out = enc(batch)
    assert out.shape == (2, 40)
    torch.testing.assert_close(out.norm(dim=1), torch.full((2,), 40**0.5))
    perm = batch[:, torch.randperm(64)]
    torch.testing.assert_close(enc(perm), out)  # order of the points does not matter


def test_shapes_render_and_bind_above_chance():
    """A tiny Point-Bind: pair clouds with a fixed random image-space code per (shape, colour) class;
    InfoNCE binds held-out clouds to their class code far above chance."""
    train, test = [random_shape(i) for i in range(96)], [random_shape(1000 + i) for i in range(24)]
    im = np.asarray(render(test[0], size=64))
    assert im.shape == (64, 64, 3) and (im < 250).any() and (im == 255).any()  # an object on white
    assert {s.kind for s in train} == set(SHAPES)
    g = torch.Generator().manual_seed(0)
    code = {k: torch.randn(32, generator=g) for k in SHAPES}
    torch.manual_seed(0)
    enc = PointEncoder(32, (16, 32), 32, points=128, dropout=0.0)
    x = enc.prepare([sample_cloud(s, 256)[0] for s in train])
    enc, losses = train_binding(enc, x, torch.stack([code[s.kind] for s in train]), steps=150, batch_size=48, lr=3e-3)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        got = enc(enc.prepare([sample_cloud(s, 256)[0] for s in test]))
    keys = torch.stack([code[k] for k in SHAPES])
    pred = [SHAPES[i] for i in (torch.nn.functional.normalize(got, dim=-1) @ keys.T).argmax(1).tolist()]
    acc = np.mean([p == s.kind for p, s in zip(pred, test)])
    assert acc > 2 / len(SHAPES), acc  # chance is 1/6
    assert recall_at_k(keys, keys)[1] == 1.0
