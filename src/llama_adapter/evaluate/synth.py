"""Drawing and bookkeeping shared by the benchmark generators (ocr.py, mme.py).

Every generated image is a 256 x 256 square (a centre crop of a Flickr8k photo, or a plain colour)
and everything drawn stays inside a 12% margin, so the encoders' centre crops (EfficientNet keeps
the central 87.5%) see all of it. Randomness comes from one `random.Random` per item, seeded by
the generator, the seed, the split and the item's index: the first n items of a split are the
same whatever n is, and the same seed gives the same bytes (Pillow's JPEG and FreeType output is
deterministic for a given Pillow build, which meta.json records).

Train/test splits hold apart by hash (`in_test`), not by the seed: a photo or a word is a test
one or a training one in every set this package generates, OCR and MME alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, ImageDraw, ImageFont

from ..multimodal.datasets import _write_jsonl
from ..multimodal.images import open_image, resize_center_crop
from .items import bar

SIZE = 256
MARGIN = 31  # 12% of SIZE on every side
TEST_FRACTION = 0.2
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
PLAIN_BACKGROUNDS = ((235, 235, 235), (200, 200, 200), (70, 70, 70), (240, 230, 210), (210, 225, 240))
SIGN_COLORS = ((250, 250, 250), (25, 25, 25), (200, 30, 30), (20, 90, 40), (20, 60, 160), (250, 200, 0))
SHAPES = ("circle", "square", "triangle", "star")
JPEG_QUALITY = 92


# ----------------------------------------------------------------------------------------------- splits
def in_test(key: str, fraction: float = TEST_FRACTION) -> bool:
    """Whether `key` (a photo's file name, a word, a number) belongs to the test split: a fixed
    hash, so every generator and every seed agree."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def split(keys: Sequence[str], test: bool) -> list[str]:
    return [k for k in keys if in_test(k) == test]


def item_rng(generator: str, seed: int, split_name: str, index: int) -> random.Random:
    """One generator per item (string seeds are hashed with SHA-512, the same in every process)."""
    return random.Random(f"{generator}:{seed}:{split_name}:{index}")


# ----------------------------------------------------------------------------------------------- photos
def photo_dirs() -> list[Path]:
    """Where the Flickr8k photos are looked for, as the model presets look for ../shared data:
    $LLAMA_ADAPTER_DATA, then ../shared/data beside the working directory and beside the repository."""
    roots = []
    env = os.environ.get("LLAMA_ADAPTER_DATA")
    if env:
        roots.append(Path(env))
    roots += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3].parent / "shared" / "data"]
    return [r / "flickr8k_1k" / "images" for r in roots]


def find_photos(photos: str | os.PathLike[str] | None = None) -> list[Path]:
    """The photo files (sorted by name) in `photos`, or in the first `photo_dirs()` folder that exists."""
    tried = [Path(photos)] if photos else photo_dirs()
    for d in tried:
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if len(files) < 2:
                raise ValueError(f"{d} holds {len(files)} photos; the generators need at least 2 (train and test)")
            return files
    raise ValueError(
        f"no photo folder found (tried {', '.join(map(str, tried))}); pass --photos DIR with JPEG/PNG photos "
        "(e.g. ../shared/data/flickr8k_1k/images)"
    )


def split_photos(photos: Sequence[Path]) -> dict[str, list[Path]]:
    by_name = {p.name: p for p in photos}
    out = {name: [by_name[k] for k in split(sorted(by_name), name == "test")] for name in ("train", "test")}
    for name, got in out.items():
        if not got:
            raise ValueError(f"none of the {len(photos)} photos falls in the {name} split; give more photos")
    return out


def square_photo(path: Path) -> Image.Image:
    return resize_center_crop(open_image(path), SIZE)


def plain_canvas(rng: random.Random) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), rng.choice(PLAIN_BACKGROUNDS))


# ----------------------------------------------------------------------------------------------- colours
def luminance(c: Sequence[float]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def mean_color(img: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    region = img.crop(box).resize((1, 1), Image.BOX)
    return region.getpixel((0, 0))[:3]


def contrasting(c: Sequence[float]) -> tuple[int, int, int]:
    """Black or white, whichever stands out more against colour `c`."""
    return (15, 15, 15) if luminance(c) > 128 else (245, 245, 245)


# ----------------------------------------------------------------------------------------------- text
def font_name() -> str:
    try:
        ImageFont.load_default(size=12)
        return f"Pillow {PIL.__version__} built-in (Aileron Regular)"
    except (TypeError, ImportError, OSError):
        return str(_dejavu())


def load_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Pillow >= 10.1 with FreeType), else DejaVu Sans (shipped
    with matplotlib, or Debian's)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.truetype(str(_dejavu()), size)


def _dejavu() -> Path:
    spec = importlib.util.find_spec("matplotlib")  # a dependency already; only its font file is used
    tried = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    if spec is not None and spec.origin:
        tried.insert(0, Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    for p in tried:
        if p.is_file():
            return p
    raise ValueError("no scalable font: install Pillow >= 10.1 with FreeType, or the DejaVu fonts")


def _rotated_size(w: int, h: int, angle: float) -> tuple[int, int]:
    a = math.radians(angle)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    return math.ceil(w * c + h * s) + 2, math.ceil(w * s + h * c) + 2


def draw_text(img: Image.Image, text: str, rng: random.Random, *, size: int, angle: float, style: str) -> dict:
    """Render `text` onto `img` in place at a random spot inside the margin; `style` "high" (black,
    white or a vivid colour against the local background), "low" (close to the background's
    brightness) or "sign" (on a plate of its own colour). The font shrinks until the rotated text
    fits. Returns what was drawn, for the item's metadata."""
    while True:
        font = load_font(size)
        left, top, right, bottom = font.getbbox(text)
        pad = max(2, round(size * (0.3 if style == "sign" else 0.08)))
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        rw, rh = _rotated_size(w, h, angle)
        if rw <= SIZE - 2 * MARGIN and rh <= SIZE - 2 * MARGIN or size <= 10:
            break
        size = max(10, int(size * 0.85))
    x = rng.randint(MARGIN, max(MARGIN, SIZE - MARGIN - rw))
    y = rng.randint(MARGIN, max(MARGIN, SIZE - MARGIN - rh))
    background = mean_color(img, (x, y, x + rw, y + rh))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    plate = None
    if style == "sign":
        plate = rng.choice([c for c in SIGN_COLORS if abs(luminance(c) - luminance(background)) > 60] or SIGN_COLORS)
        d.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(1, pad // 2), fill=(*plate, 255))
        color = contrasting(plate)
    elif style == "low":
        shift = 45 if luminance(background) < 128 else -45
        color = tuple(min(255, max(0, v + shift)) for v in background)
    else:
        vivid = [c for c in COLORS.values() if abs(luminance(c) - luminance(background)) > 90]
        color = rng.choice(vivid + [contrasting(background)] * 2)
    d.text((pad - left, pad - top), text, font=font, fill=(*color, 255))
    rotated = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
    ox, oy = x + (rw - rotated.width) // 2, y + (rh - rotated.height) // 2
    img.paste(rotated, (ox, oy), rotated)
    return {
        "font_size": size,
        "rotation": angle,
        "style": style,
        "color": list(color),
        "plate": list(plate) if plate else None,
        "box": [x, y, x + rw, y + rh],
    }


def size_bin(size: int) -> str:
    return "small" if size < 24 else "medium" if size < 40 else "large"


# ----------------------------------------------------------------------------------------------- shapes
def shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a triangle or star (circles and squares are drawn directly)."""
    if kind == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    pts = []
    for k in range(10):  # a five-pointed star: outer and inner radius alternate
        a = math.radians(-90 + 36 * k)
        rr = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(img: Image.Image, kind: str, color: str, cx: int, cy: int, r: int) -> None:
    d = ImageDraw.Draw(img)
    fill = COLORS[color]
    outline = contrasting(fill)  # visible on a photo, whatever lies under it
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=2)
    elif kind == "square":
        s = round(r * 0.85)
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=2)
    else:
        d.polygon(shape_points(kind, cx, cy, r), fill=fill, outline=outline, width=2)


def place(rng: random.Random, radii: Sequence[int], tries: int = 400) -> list[tuple[int, int]] | None:
    """Centres for circles of `radii` inside the margin without overlaps (None if they do not fit)."""
    out: list[tuple[int, int]] = []
    for r in radii:
        for _ in range(tries):
            c = (rng.randint(MARGIN + r, SIZE - MARGIN - r), rng.randint(MARGIN + r, SIZE - MARGIN - r))
            if all(math.dist(c, o) > r + ro + 6 for o, ro in zip(out, radii)):
                out.append(c)
                break
        else:
            return None
    return out


# ----------------------------------------------------------------------------------------------- output
class Output:
    """A generator's output folder: images, JSONL files and meta.json. A folder that holds other
    things is refused; one written by the same generator before is replaced."""

    def __init__(self, out: str | os.PathLike[str], generator: str) -> None:
        self.root = Path(out)
        self.generator = generator
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--out {self.root} is a file; give a folder")
        if self.root.is_dir() and any(self.root.iterdir()):
            meta = self.root / "meta.json"
            try:
                ours = json.loads(meta.read_text()).get("generator") == generator
            except (OSError, ValueError, AttributeError):
                ours = False
            if not ours:
                raise ValueError(f"--out {self.root} is not empty and was not written by {generator}; use a new folder")
            for sub in ("images", "controls"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
        (self.root / "images").mkdir(parents=True, exist_ok=True)

    def save(self, img: Image.Image, rel: str) -> str:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, "JPEG", quality=JPEG_QUALITY)
        return rel

    def write(self, splits: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Path]:
        paths = {}
        for name, rows in splits.items():
            paths[name] = self.root / f"{name}.jsonl"
            _write_jsonl(paths[name], rows)
        meta = {"generator": self.generator, "pillow": PIL.__version__, "font": font_name(), **meta}
        (self.root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return paths


def generate(
    name: str,
    out: str | os.PathLike[str],
    item: Callable[[Output, str, int, list[Path]], list[dict[str, Any]]],
    *,
    n_train: int,
    n_test: int,
    photos: str | os.PathLike[str] | None,
    progress: bool,
    meta: dict[str, Any],
) -> dict[str, Path]:
    """The loop every generator shares: `item(output, split, index, split's photos)` draws and saves
    one image and returns its JSONL rows; train.jsonl, test.jsonl and meta.json are written last."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"--n-train {n_train} --n-test {n_test}: give non-negative counts, not both 0")
    pools = split_photos(find_photos(photos))
    output = Output(out, f"llama-adapter data make-{name}")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    progress_bar = bar(n_train + n_test, f"make-{name}", progress)
    for split_name, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            rows[split_name] += item(output, split_name, i, pools[split_name])
            progress_bar.update(1)
    progress_bar.close()
    photos_used = {k: len(v) for k, v in pools.items()}
    info = {"n_train": n_train, "n_test": n_test, "photos": photos_used, "test_fraction": TEST_FRACTION, "size": SIZE}
    return output.write(rows, {**info, **meta})
