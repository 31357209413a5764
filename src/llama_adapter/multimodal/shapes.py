"""Procedural 3D shapes for binding point clouds to images (Point-Bind's recipe at toy scale): a
seeded random object (cube, sphere, cylinder, cone, torus, pyramid; random size, pose and colour)
gives both a coloured point cloud sampled from its surface and a shaded picture of it, rendered
with numpy (points splatted into a z-buffer, Lambert shading), so the pair (cloud, picture) shows
the same object and its description ("a red cone") is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid")
COLOURS = {
    "red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
    "yellow": (0.92, 0.82, 0.15), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.5, 0.1),
}  # fmt: skip
LIGHT = np.array([0.4, 0.5, 0.77]) / np.linalg.norm([0.4, 0.5, 0.77])


@dataclass
class Shape:
    kind: str
    colour: str
    scale: float
    rotation: np.ndarray  # [3, 3]
    seed: int

    @property
    def description(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.colour} {self.kind}"


def random_shape(seed: int, kinds: tuple[str, ...] = SHAPES) -> Shape:
    """A seeded random shape: kind, colour, size (0.6-1.0) and a uniformly random rotation."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))  # Haar-uniform rotation
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return Shape(kinds[rng.integers(len(kinds))], list(COLOURS)[rng.integers(len(COLOURS))],
                 float(rng.uniform(0.6, 1.0)), q, seed)  # fmt: skip


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-9)


def _by_area(rng: np.random.Generator, n: int, areas: list[float]) -> np.ndarray:
    return rng.choice(len(areas), n, p=np.asarray(areas) / sum(areas))


def _surface(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on a canonical shape's surface (about unit size) and their normals."""
    u, v = rng.uniform(size=n), rng.uniform(size=n)
    if kind == "sphere":
        nrm = _unit(rng.normal(size=(n, 3)))
        return nrm.copy(), nrm
    if kind == "cube":
        face = rng.integers(6, size=n)
        axis, sign = face // 2, np.where(face % 2, 1.0, -1.0)
        p = rng.uniform(-0.8, 0.8, size=(n, 3))
        p[np.arange(n), axis] = 0.8 * sign
        nrm = np.zeros((n, 3))
        nrm[np.arange(n), axis] = sign
        return p, nrm
    if kind == "cylinder":  # radius 0.6, height 1.6
        t = 2 * math.pi * u
        part = _by_area(rng, n, [2 * math.pi * 0.6 * 1.6, math.pi * 0.36, math.pi * 0.36])
        rad = np.where(part == 0, 0.6, 0.6 * np.sqrt(v))
        z = np.where(part == 0, rng.uniform(-0.8, 0.8, n), np.where(part == 1, 0.8, -0.8))
        p = np.stack([rad * np.cos(t), rad * np.sin(t), z], 1)
        nrm = np.where((part == 0)[:, None], np.stack([np.cos(t), np.sin(t), 0 * t], 1),
                       np.stack([0 * t, 0 * t, np.where(part == 1, 1.0, -1.0)], 1))  # fmt: skip
        return p, nrm
    if kind == "cone":  # base radius 0.8 at z=-0.8, apex at z=0.8
        r, h = 0.8, 1.6
        s = math.hypot(r, h)
        t = 2 * math.pi * u
        side = _by_area(rng, n, [math.pi * r * s, math.pi * r * r]) == 0
        f = np.sqrt(v)  # uniform in area: distance from the apex grows like sqrt
        rad = np.where(side, r * f, r * np.sqrt(rng.uniform(size=n)))
        z = np.where(side, 0.8 - h * f, -0.8)
        p = np.stack([rad * np.cos(t), rad * np.sin(t), z], 1)
        nrm = np.where(side[:, None], np.stack([np.cos(t) * h / s, np.sin(t) * h / s, np.full(n, r / s)], 1),
                       np.array([0.0, 0.0, -1.0]))  # fmt: skip
        return p, nrm
    if kind == "torus":  # R 0.65, r 0.28; rejection keeps the density uniform in area
        R, r = 0.65, 0.28
        t, ph = 2 * math.pi * rng.uniform(size=4 * n), 2 * math.pi * rng.uniform(size=4 * n)
        ok = rng.uniform(size=4 * n) < (R + r * np.cos(ph)) / (R + r)
        t, ph = t[ok][:n], ph[ok][:n]
        nrm = np.stack([np.cos(ph) * np.cos(t), np.cos(ph) * np.sin(t), np.sin(ph)], 1)
        p = np.stack([(R + r * np.cos(ph)) * np.cos(t), (R + r * np.cos(ph)) * np.sin(t), r * np.sin(ph)], 1)
        return p, nrm
    if kind == "pyramid":  # square base 1.6 x 1.6 at z=-0.7, apex at z=0.9
        a, h = 0.8, 1.6
        corners = np.array([[a, a], [-a, a], [-a, -a], [a, -a]])
        slant = math.hypot(a, h)
        part = _by_area(rng, n, [4 * a * a] + [a * slant] * 4)
        w = np.sqrt(u)
        p = np.zeros((n, 3))
        base = part == 0
        p[base] = np.stack([rng.uniform(-a, a, base.sum()), rng.uniform(-a, a, base.sum()),
                            np.full(base.sum(), -0.7)], 1)  # fmt: skip
        nrm = np.zeros((n, 3))
        nrm[base] = [0, 0, -1]
        for k in range(4):
            m = part == k + 1
            c0, c1 = corners[k], corners[(k + 1) % 4]
            b = (1 - v[m])[:, None] * c0 + v[m][:, None] * c1  # a point on the base edge
            p[m] = np.concatenate([w[m][:, None] * b, (0.9 - h * w[m])[:, None]], 1)
            mid = (c0 + c1) / 2
            nrm[m] = _unit(np.array([mid[0] * h / a, mid[1] * h / a, a]))
        return p, nrm
    raise ValueError(f"unknown shape {kind!r}; choose one of {', '.join(SHAPES)}")


def sample_cloud(shape: Shape, n: int = 2048, noise: float = 0.005) -> tuple[torch.Tensor, np.ndarray]:
    """(float32 [n, 6] cloud: posed surface points + their colour in 0..1, posed normals [n, 3])."""
    rng = np.random.default_rng(shape.seed + 7919)
    p, nrm = _surface(shape.kind, n, rng)
    p = (p * shape.scale) @ shape.rotation.T + rng.normal(scale=noise, size=p.shape)
    nrm = nrm @ shape.rotation.T
    rgb = np.broadcast_to(np.asarray(COLOURS[shape.colour]), (n, 3))
    return torch.from_numpy(np.concatenate([p, rgb], 1).astype(np.float32)), nrm


def render(shape: Shape, size: int = 224, n: int = 24_000, background: int = 255) -> Image.Image:
    """A shaded picture of the posed shape, seen along -z from a camera 20 degrees above (orthographic):
    dense surface points splatted into a z-buffer, Lambert shading plus ambient light."""
    cloud, nrm = sample_cloud(shape, n, noise=0.0)
    p = cloud[:, :3].double().numpy()
    el = math.radians(20)
    cam = np.array([[1, 0, 0], [0, math.cos(el), -math.sin(el)], [0, math.sin(el), math.cos(el)]])
    p, nrm = p @ cam.T, nrm @ cam.T
    facing = nrm[:, 2] > 0  # back faces are hidden by the front ones anyway; skipping them saves splats
    shade = 0.35 + 0.65 * np.clip(_unit(nrm) @ LIGHT, 0, 1)
    rgb = (np.asarray(COLOURS[shape.colour])[None] * shade[:, None] * 255).clip(0, 255)
    half = size / 2
    px, py, depth = p[:, 0] * half * 0.55 + half, half - p[:, 1] * half * 0.55, p[:, 2]
    cand = []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            cand.append((np.round(px + dx).astype(int), np.round(py + dy).astype(int)))
    xs = np.concatenate([c[0] for c in cand])
    ys = np.concatenate([c[1] for c in cand])
    zs, cs, ok = np.tile(depth, 9), np.tile(rgb, (9, 1)), np.tile(facing, 9)
    ok &= (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
    order = np.argsort(zs[ok], kind="stable")  # far first: nearer splats overwrite them
    img = np.full((size, size, 3), background, np.uint8)
    img[ys[ok][order], xs[ok][order]] = cs[ok][order].astype(np.uint8)
    return Image.fromarray(img)
