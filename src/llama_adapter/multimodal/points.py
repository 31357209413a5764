"""3D point clouds bound to the image space, as Point-Bind does (arXiv 2309.00615): a small
PointNet-style encoder is trained with InfoNCE (bind.py) to land where the frozen image encoder puts
rendered views of the same object; from there a cloud takes an image's path into the adapter.

Files (`read_points`): `.ply` (ascii or binary_little_endian; the `vertex` element's x, y, z and,
if present, red, green, blue), `.npy` (an N x 3 or N x 6 numeric array) and `.xyz` (text, 3 or 6
numbers per line). Colours may be 0-1 floats or 0-255; a cloud without colours is grey.
Bounded work: a cloud of more than `MAX_POINTS` points is subsampled when read to `MAX_POINTS`
points chosen uniformly at random with a fixed seed (the same file always gives the same cloud),
reading only those rows from binary files (memory-mapped) and parsing only those lines of text
ones; text files over `MAX_TEXT_BYTES` are refused. NaN/Inf, a wrong column count or no points
are one-line ValueErrors naming the file.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bind import to_sphere

MAX_POINTS = 65_536  # read at most this many points of a cloud (uniform random subsample, seed 0)
ENCODER_POINTS = 512  # points the encoder sees per cloud (by default; each encoder records its own)
MAX_TEXT_BYTES = 2 << 30  # .xyz / ascii .ply larger than this are refused (convert to binary .ply or .npy)
POINT_FORMATS = ("ply", "npy", "xyz")
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
    "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip


def _keep(n: int) -> np.ndarray | None:
    """Sorted row indices to keep of n (None = all): the documented subsample."""
    if n <= MAX_POINTS:
        return None
    return np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))


def _check(a: np.ndarray, name: str) -> np.ndarray:
    """[N, 3 | 6] finite numbers -> float32 [N, 6] (x y z r g b, colours in 0..1; grey if absent)."""
    if a.ndim != 2 or a.shape[1] not in (3, 6):
        shape = "x".join(str(s) for s in a.shape)
        raise ValueError(f"{name} holds a {shape} array; expected N x 3 (x y z) or N x 6 (x y z r g b)")
    if a.shape[0] == 0:
        raise ValueError(f"{name} has 0 points")
    a = a.astype(np.float32)
    bad = ~np.isfinite(a).all(1)
    if bad.any():
        raise ValueError(f"{name} has NaN or Inf values (first at point {int(bad.argmax())}); remove those points")
    if a.shape[1] == 3:
        return np.concatenate([a, np.full((a.shape[0], 3), 0.5, np.float32)], 1)
    rgb = a[:, 3:]
    if rgb.min() < 0 or rgb.max() > 255:
        raise ValueError(f"{name}: colour values must lie in 0..1 or 0..255, got {rgb.min():g}..{rgb.max():g}")
    if rgb.max() > 1:
        a[:, 3:] = rgb / 255.0
    return a


def _text_rows(lines: Iterable[bytes], n: int, name: str, cols: int | None = None) -> np.ndarray:
    """Parse the first n non-empty lines (or MAX_POINTS of them, by `_keep`) of whitespace-separated
    numbers; `cols` = how many leading columns to use (None: all, which must agree)."""
    keep = _keep(n)
    want = None if keep is None else set(keep.tolist())
    rows, i = [], 0
    for line in lines:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if i >= n:
            break
        if want is None or i in want:
            parts = line.split()
            try:
                rows.append([float(x) for x in (parts if cols is None else parts[:cols])])
            except ValueError:
                raise ValueError(f"{name}: point {i} is not numbers: {line[:60]!r}") from None
            if cols is None and len(rows[-1]) != len(rows[0]):
                raise ValueError(f"{name}: point {i} has {len(rows[-1])} columns, point 0 has {len(rows[0])}")
        i += 1
    if i < n:
        raise ValueError(f"{name} is truncated: {i} of {n} points")
    if not rows:
        return np.zeros((0, cols or 3), np.float32)
    if cols is not None and any(len(r) != cols for r in rows):
        raise ValueError(f"{name}: a point has fewer than the {cols} properties the header declares")
    return np.asarray(rows, dtype=np.float64)


def _read_xyz(f: io.BufferedIOBase, size: int, name: str) -> np.ndarray:
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"{name} is {size / 2**30:.1f} GiB of text; convert it to binary .ply or .npy")
    n = sum(1 for line in f if line.strip() and not line.lstrip().startswith(b"#"))
    f.seek(0)
    return _text_rows(f, n, name)


def _ply_header(f: io.BufferedIOBase, name: str) -> tuple[str, int, list[tuple[str, str]], bool]:
    """(format, vertex count, vertex properties [(name, type)], vertex element comes first)."""
    if f.readline().strip() != b"ply":
        raise ValueError(f"{name} is not a PLY file (it must start with 'ply')")
    fmt, count, props, first, elem, seen = None, None, [], True, None, 0
    for _ in range(10_000):
        line = f.readline()
        if not line:
            raise ValueError(f"{name}: PLY header has no end_header line")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elem, seen = words[1], seen + 1
            if elem == "vertex":
                count, first = int(words[2]), seen == 1
        elif words[0] == "property" and elem == "vertex":
            if words[1] == "list" or len(words) != 3 or words[1] not in _PLY_TYPES:
                raise ValueError(f"{name}: unsupported vertex property {' '.join(words[1:])!r}")
            props.append((words[2], words[1]))
        elif words[0] not in ("property",):
            raise ValueError(f"{name}: unexpected PLY header line {line[:60]!r}")
    else:
        raise ValueError(f"{name}: PLY header is too long")
    if fmt not in ("ascii", "binary_little_endian"):
        raise ValueError(f"{name}: PLY format {fmt!r} is not supported; save it as ascii or binary_little_endian")
    if count is None:
        raise ValueError(f"{name}: PLY file has no vertex element")
    return fmt, count, props, first


def _read_ply(path: Path | None, f: io.BufferedIOBase, size: int, name: str) -> np.ndarray:
    fmt, n, props, first = _ply_header(f, name)
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"{name}: the vertex element needs x, y and z properties, it has {names}")
    cols = ["x", "y", "z"] + (["red", "green", "blue"] if {"red", "green", "blue"} <= set(names) else [])
    if not first:
        raise ValueError(f"{name}: the vertex element must come first in the PLY file")
    if fmt == "ascii":
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"{name} is {size / 2**30:.1f} GiB of text; save it as binary_little_endian PLY")
        a = _text_rows(f, n, name, cols=len(props))
        return a[:, [names.index(c) for c in cols]] if len(a) else np.zeros((0, 3))
    dtype = np.dtype([(p, _PLY_TYPES[t]) for p, t in props])
    offset = f.tell()
    if size - offset < n * dtype.itemsize:
        raise ValueError(f"{name} is truncated: the header declares {n} points, the data holds fewer")
    keep = _keep(n)
    if path is not None:  # memory-mapped: only the kept rows are read
        rec = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,))
    else:
        rec = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)
    rec = rec if keep is None else rec[keep]
    return np.stack([np.asarray(rec[c], dtype=np.float64) for c in cols], 1) if n else np.zeros((0, 3))


def _read_npy(src: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        a = np.load(src, mmap_mode="r" if isinstance(src, Path) else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a damaged header fails in numpy's parser with anything (SyntaxError, TokenError...)
        raise ValueError(f"{name} is not a readable .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold a numeric array, not {getattr(a, 'dtype', type(a))}")
    if a.ndim == 2 and a.shape[0] > MAX_POINTS:
        a = a[_keep(a.shape[0])]
    return np.asarray(a)


def read_points(src: str | os.PathLike[str] | bytes, fmt: str | None = None) -> torch.Tensor:
    """A point cloud file (or its bytes with `fmt` "ply"/"npy"/"xyz") -> float32 [N, 6]: x y z,
    then r g b in 0..1 (0.5 grey when the file has no colours); N <= MAX_POINTS (see the module
    docstring for the subsample). ValueError naming the file for anything unusable."""
    if isinstance(src, bytes):
        fmt = (fmt or "").lower().lstrip(".")
        name, path, f, size = f"the {fmt} point cloud", None, io.BytesIO(src), len(src)
    else:
        path = Path(src)
        name, fmt = f"point cloud {path}", path.suffix.lower().lstrip(".")
        if not path.is_file():
            raise ValueError(f"point cloud {path} not found; check the path")
        size = path.stat().st_size
    if fmt not in POINT_FORMATS:
        raise ValueError(f"{name}: format {fmt!r} is not supported; use .ply, .npy or .xyz")
    if fmt == "npy":
        a = _read_npy(path if path is not None else f, name)
    else:
        with f if path is None else open(path, "rb") as fh:
            try:
                a = _read_ply(path, fh, size, name) if fmt == "ply" else _read_xyz(fh, size, name)
            except UnicodeDecodeError as e:
                raise ValueError(f"{name} is not readable text ({e})") from e
    return torch.from_numpy(_check(a, name))


def normalize_cloud(points: torch.Tensor, n: int = ENCODER_POINTS, seed: int = 0) -> torch.Tensor:
    """[N, 6] -> [n, 6] as the encoder takes it: n points drawn with a fixed seed (with replacement
    when N < n), centred on the bounding box and scaled into the unit ball (size is not identity:
    a small and a large cube are both cubes), colours mapped to -1..1."""
    g = torch.Generator().manual_seed(seed)
    N = points.shape[0]
    idx = torch.randperm(N, generator=g)[:n] if N >= n else torch.randint(N, (n,), generator=g)
    p = points[idx].float()
    xyz = p[:, :3] - (p[:, :3].amax(0) + p[:, :3].amin(0)) / 2
    xyz = xyz / xyz.norm(dim=1).amax().clamp(min=1e-6)
    return torch.cat([xyz, p[:, 3:] * 2 - 1], 1)


class PointEncoder(nn.Module):
    """PointNet (Qi et al. 2017) at small scale: a shared per-point MLP (6 -> widths), max-pooled
    over the points (order-invariant), then a 2-layer head into the image space, put on its sphere
    (as `bind.BindProjection`). Trained with `bind.train_binding`; `logit_scale` is its InfoNCE
    temperature."""

    def __init__(
        self,
        out_dim: int,
        widths: tuple[int, ...] = (64, 128, 256),
        hidden: int = 256,
        dropout: float = 0.1,
        points: int = ENCODER_POINTS,
    ) -> None:
        super().__init__()
        self.points = points  # how many points of a cloud it sees (normalize_cloud)
        dims = (6, *widths)
        self.point_mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Sequential(
            nn.Linear(dims[-1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, clouds: torch.Tensor) -> torch.Tensor:
        """[B, n, 6] normalised clouds -> [B, out_dim] on the sphere of radius sqrt(out_dim)."""
        x = clouds.to(self.head[0].weight.dtype)
        for i, lin in enumerate(self.point_mlp):
            x = lin(x)
            if i < len(self.point_mlp) - 1:
                x = F.relu(x)
        return to_sphere(self.head(x.amax(1)))

    def config(self) -> dict[str, object]:
        """What rebuilds this module (recorded in the adapter's metadata)."""
        widths = tuple(m.out_features for m in self.point_mlp)
        return {"out_dim": self.head[-1].out_features, "widths": list(widths), "hidden": self.head[0].out_features,
                "points": self.points}  # fmt: skip

    def prepare(self, clouds: list[torch.Tensor]) -> torch.Tensor:
        """Clouds [N_i, 6] as read -> the batch [B, points, 6] this encoder takes."""
        return torch.stack([normalize_cloud(c, self.points) for c in clouds])


def points_format(name: str) -> str | None:
    """'ply' / 'npy' / 'xyz' for a file name, else None."""
    m = re.search(r"\.(ply|npy|xyz)$", name.lower())
    return m.group(1) if m else None
