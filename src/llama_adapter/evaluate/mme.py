"""An MME-style perception set: per image two yes/no questions with opposite answers.

Shapes (circle, square, triangle, star in six colours) are drawn on a plain background or a
Flickr8k photo (centre-cropped to 256 x 256); the subtask decides what is asked:

- existence: "Is there a star in the image?" yes / "Is there a circle in the image?" no;
- count: "Are there exactly three squares in the image?" yes / "... exactly two ..." no;
- position: "Is the red circle to the left of the blue square?" yes / "... to the right of ..." no
  (also above / below);
- color: "Is there a red circle in the image?" yes / "Is there a blue circle in the image?" no;
- ocr: 'Is the word "lantern" written in the image?' yes / 'Is the word "pebble" ...?' no.

Every question ends in MME's " Please answer yes or no." and is scored as MME scores
(`metrics.mme_scores`: accuracy, accuracy+ = both questions of an image right, score = acc + acc+
in percent, at most 200 per subtask). Train and test hold apart by photo and by OCR word, as in
ocr.py. Files: `OUT/train.jsonl`, `OUT/test.jsonl` (one line per question: `image`,
`instruction`, `output` "Yes"/"No", `answer`, `subtask`, `pair`), `OUT/images/`, `OUT/meta.json`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from . import synth
from .words import WORDS

MME_SUBTASKS = ("existence", "count", "position", "color", "ocr")
MME_SUFFIX = " Please answer yes or no."
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")
RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}
Questions = tuple[str, str]  # (the question whose answer is yes, the one whose answer is no)


def _plural(kind: str) -> str:
    return kind + "s"


def _shapes(img: Image.Image, rng: random.Random, specs: list[tuple[str, str]], r_range=(20, 32)) -> list[tuple]:
    """Draw (kind, colour) shapes at free spots; returns (kind, colour, cx, cy, r) per shape."""
    while True:
        radii = [rng.randint(*r_range) for _ in specs]
        centres = synth.place(rng, radii)
        if centres is not None:
            break
        r_range = (max(10, r_range[0] - 4), max(12, r_range[1] - 4))
    for (kind, color), (cx, cy), r in zip(specs, centres, radii):
        synth.draw_shape(img, kind, color, cx, cy, r)
    return [(k, c, cx, cy, r) for (k, c), (cx, cy), r in zip(specs, centres, radii)]


def existence(img: Image.Image, rng: random.Random, words: list[str]) -> Questions:
    kinds = rng.sample(synth.SHAPES, rng.randint(1, 3))
    _shapes(img, rng, [(k, rng.choice(tuple(synth.COLORS))) for k in kinds])
    absent = rng.choice([k for k in synth.SHAPES if k not in kinds])
    return f"Is there a {rng.choice(kinds)} in the image?", f"Is there a {absent} in the image?"


def count(img: Image.Image, rng: random.Random, words: list[str]) -> Questions:
    kind, color = rng.choice(synth.SHAPES), rng.choice(tuple(synth.COLORS))
    n = rng.randint(1, 4)
    others = [k for k in synth.SHAPES if k != kind]
    distractors = [(rng.choice(others), rng.choice(tuple(synth.COLORS))) for _ in range(rng.randint(0, 2))]
    specs = [(kind, color)] * n + distractors
    rng.shuffle(specs)
    _shapes(img, rng, specs, (16, 26))
    wrong = n + rng.choice((-1, 1)) if n > 1 else 2

    def ask(k: int) -> str:
        return (
            f"Is there exactly one {kind} in the image?"
            if k == 1
            else (f"Are there exactly {COUNT_WORDS[k]} {_plural(kind)} in the image?")
        )

    return ask(n), ask(wrong)


def position(img: Image.Image, rng: random.Random, words: list[str]) -> Questions:
    (ka, kb), (ca, cb) = rng.sample(synth.SHAPES, 2), rng.sample(tuple(synth.COLORS), 2)
    rel = rng.choice(tuple(RELATIONS))
    ra, rb = rng.randint(18, 30), rng.randint(18, 30)
    lo, hi = synth.MARGIN + 30, synth.SIZE - synth.MARGIN - 30
    along = sorted(rng.sample(range(lo, hi), 2))
    while along[1] - along[0] < ra + rb + 16:
        along = sorted(rng.sample(range(lo, hi), 2))
    across = [rng.randint(lo + 20, hi - 20)] * 2
    across[1] = min(hi, max(lo, across[0] + rng.randint(-15, 15)))  # roughly in line: the relation is clear
    first, second = (along[0], along[1]) if rel in ("left", "above") else (along[1], along[0])
    if rel in ("left", "right"):
        (xa, ya), (xb, yb) = (first, across[0]), (second, across[1])
    else:
        (xa, ya), (xb, yb) = (across[0], first), (across[1], second)
    synth.draw_shape(img, ka, ca, xa, ya, ra)
    synth.draw_shape(img, kb, cb, xb, yb, rb)

    def ask(r: str) -> str:
        where = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[r]
        return f"Is the {ca} {ka} {where} the {cb} {kb}?"

    return ask(rel), ask(RELATIONS[rel])


def color(img: Image.Image, rng: random.Random, words: list[str]) -> Questions:
    kinds = rng.sample(synth.SHAPES, rng.randint(1, 2))
    specs = [(k, rng.choice(tuple(synth.COLORS))) for k in kinds]
    _shapes(img, rng, specs)
    kind, col = rng.choice(specs)
    wrong = rng.choice([c for c in synth.COLORS if (kind, c) not in specs])
    return f"Is there a {col} {kind} in the image?", f"Is there a {wrong} {kind} in the image?"


def ocr(img: Image.Image, rng: random.Random, words: list[str]) -> Questions:
    word, other = rng.sample(words, 2)
    synth.draw_text(img, word, rng, size=rng.randint(24, 56), angle=0, style=rng.choice(("high", "sign")))
    return f'Is the word "{word}" written in the image?', f'Is the word "{other}" written in the image?'


SUBTASKS: dict[str, Callable[[Image.Image, random.Random, list[str]], Questions]] = {
    "existence": existence,
    "count": count,
    "position": position,
    "color": color,
    "ocr": ocr,
}


def mme_image(
    out: synth.Output, split_name: str, index: int, seed: int, photos: list[Path], words: list[str]
) -> list[dict[str, Any]]:
    """Draw image `index` of a split, save it and return its two question rows (yes first)."""
    rng = synth.item_rng("mme", seed, split_name, index)
    subtask = MME_SUBTASKS[index % len(MME_SUBTASKS)]
    photo = rng.choice(photos) if rng.random() < 0.5 else None
    img = synth.square_photo(photo) if photo else synth.plain_canvas(rng)
    yes_no = SUBTASKS[subtask](img, rng, words)
    pair = f"{split_name}-{index:05d}"
    image = out.save(img, f"images/{pair}.jpg")
    return [
        {
            "id": f"mme-{pair}-{answer}",
            "image": image,
            "instruction": question + MME_SUFFIX,
            "output": answer.capitalize(),
            "answer": answer,
            "subtask": subtask,
            "pair": pair,
            "background": photo.name if photo else "plain",
        }
        for question, answer in zip(yes_no, ("yes", "no"))
    ]


def make_mme(
    out: str | os.PathLike[str],
    *,
    n_train: int = 1000,
    n_test: int = 250,
    seed: int = 0,
    photos: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the MME-style set, `n_train` / `n_test` images (two questions each, the subtasks in
    turn); returns {"train": path, "test": path}."""
    words = {name: synth.split(WORDS, name == "test") for name in ("train", "test")}

    def item(output: synth.Output, split_name: str, i: int, pool: list[Path]) -> list[dict[str, Any]]:
        return mme_image(output, split_name, i, seed, pool, words[split_name])

    meta = {"seed": seed, "subtasks": list(MME_SUBTASKS)}
    return synth.generate("mme", out, item, n_train=n_train, n_test=n_test, photos=photos, progress=progress, meta=meta)
