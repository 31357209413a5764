"""A TextVQA-style OCR set: words and short numbers rendered onto Flickr8k photos.

Each item is a photo (centre-cropped to 256 x 256) with one word or number drawn on it at a random
spot, font size (16-64 px), rotation (0, or up to 30 degrees either way), colour and contrast
style ("high": black, white or a vivid colour that stands out; "low": close to the background's
brightness; "sign": on a plate of its own colour), and a question: "What word is written in the
image?", "What number is on the sign?" ... The answer is scored by the VQA accuracy rule
(`metrics.vqa_accuracy`).

Train and test hold apart by photo and by word (and number): `synth.in_test` puts a fixed fifth of
the photos and of the vocabulary in the test split, so test words never appear in training and
memorising the vocabulary cannot score. Every item also names a no-text control image (the same
photo without the text): a model that answers right there is guessing.

Files: `OUT/train.jsonl`, `OUT/test.jsonl` (the image-text JSONL `finetune --image-encoder` reads:
`image`, `instruction`, `output`, plus `answers`, `subtask`, `control_image` and what was drawn),
`OUT/images/`, `OUT/controls/`, `OUT/meta.json`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from ..multimodal.datasets import VQA_SUFFIX
from . import synth
from .words import WORDS

OCR_SUBTASKS = ("word", "number")
WORD_QUESTIONS = (
    "What word is written in the image?",
    "What does the text in the image say?",
    "Which word can you read in this picture?",
    "What is written in the photo?",
)
NUMBER_QUESTIONS = ("What number is written in the image?", "Which number can you see in the picture?")
SIGN_QUESTION = "What number is on the sign?"
STYLES = ("high", "low", "sign")
SIZES = {"small": (16, 23), "medium": (24, 39), "large": (40, 64)}
NUMBERS = tuple(str(n) for n in range(1, 1000))


def vocabulary(test: bool) -> dict[str, list[str]]:
    """The words and numbers of one split (disjoint from the other split's)."""
    return {"word": synth.split(WORDS, test), "number": synth.split(NUMBERS, test)}


def _text_case(word: str, rng: random.Random) -> str:
    r = rng.random()
    return word.upper() if r < 0.25 else word.title() if r < 0.5 else word


def ocr_item(
    out: synth.Output, split_name: str, index: int, seed: int, photos: list[Path], vocab: dict[str, list[str]]
) -> dict[str, Any]:
    """Draw item `index` of a split, save its image (and its photo's control) and return its row."""
    rng = synth.item_rng("ocr", seed, split_name, index)
    subtask = "number" if index % 3 == 2 else "word"
    answer = rng.choice(vocab[subtask])
    text = _text_case(answer, rng) if subtask == "word" else answer
    photo = rng.choice(photos)
    style = rng.choice(STYLES)
    lo, hi = SIZES[rng.choice(tuple(SIZES))]
    size = rng.randint(lo, hi)
    angle = 0 if rng.random() < 0.4 else rng.randint(-30, 30)
    if subtask == "word":
        question = rng.choice(WORD_QUESTIONS)
    else:
        question = SIGN_QUESTION if style == "sign" else rng.choice(NUMBER_QUESTIONS)
    clean = synth.square_photo(photo)
    control = f"controls/{photo.stem}.jpg"
    if not (out.root / control).is_file():
        out.save(clean, control)
    img = clean.copy()
    drawn = synth.draw_text(img, text, rng, size=size, angle=angle, style=style)
    item_id = f"{split_name}-{index:05d}"
    return {
        "id": f"ocr-{item_id}",
        "image": out.save(img, f"images/{item_id}.jpg"),
        "instruction": question + VQA_SUFFIX,
        "output": answer,
        "answers": [answer],
        "subtask": subtask,
        "control_image": control,
        "photo": photo.name,
        "text": text,
        "size": synth.size_bin(drawn["font_size"]),
        **drawn,
    }


def make_ocr(
    out: str | os.PathLike[str],
    *,
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    photos: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the OCR set (see the module docstring); returns {"train": path, "test": path}."""
    vocab = {name: vocabulary(name == "test") for name in ("train", "test")}

    def item(output: synth.Output, split_name: str, i: int, pool: list[Path]) -> list[dict[str, Any]]:
        return [ocr_item(output, split_name, i, seed, pool, vocab[split_name])]

    meta = {"seed": seed, "words": {k: len(v["word"]) for k, v in vocab.items()}}
    return synth.generate("ocr", out, item, n_train=n_train, n_test=n_test, photos=photos, progress=progress, meta=meta)
