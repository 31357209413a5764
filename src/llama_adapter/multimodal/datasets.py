"""Image-text data: the JSONL format training and evaluation read, and converters that write it from
Flickr8k captions and the easy-VQA package."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..adapter import _atomic_write
from ..data import file_has_images, load_examples


def load_image_examples(path: str | os.PathLike[str], check_images: bool = True) -> list[dict[str, Any]]:
    """Read image-text JSONL: {"image": path | null, "instruction": ... | "messages": [...],
    "output": ..., optional "input", "references", "choices"}; image paths may be relative to
    the JSONL's folder and come back absolute."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {p} not found")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from e
            if not isinstance(ex, dict) or not ("instruction" in ex or "messages" in ex):
                raise ValueError(f"{p}:{n}: each line needs an 'instruction' or 'messages' field (and 'image')")
            if "messages" not in ex and "output" not in ex:
                raise ValueError(f"{p}:{n}: 'instruction' rows need an 'output'")
            img = ex.get("image")
            if img:
                ip = Path(img)
                if not ip.is_absolute():
                    ip = p.parent / ip
                if check_images and not ip.is_file():
                    raise ValueError(f"{p}:{n}: image {ip} not found (relative paths are relative to {p.parent})")
                ex["image"] = str(ip)
            else:
                ex["image"] = None
            out.append(ex)
    if not out:
        raise ValueError(f"{p} holds no examples")
    return out


def load_any_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One data file for joint image + text training: an image-text JSONL (any row with an
    "image" key; `load_image_examples`) or an Alpaca / chat file (`data.load_examples`, every row
    gets image None). Rows without an image then add nothing visual (has_image False)."""
    if file_has_images(path):
        return load_image_examples(path)
    return [{**ex, "image": None} for ex in load_examples(path)]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    rows = list(rows)
    _atomic_write(
        path,
        lambda t: Path(t).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"),
    )
    return len(rows)


CAPTION_INSTRUCTION = "Describe the image."


def _clean_caption(c: str) -> str:
    c = " ".join(c.split())
    c = c[:-2] + "." if c.endswith(" .") else c
    return c[:1].upper() + c[1:]


def flickr8k_to_jsonl(
    captions_csv: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n_train: int = 900,
    n_val: int = 100,
    instruction: str = CAPTION_INSTRUCTION,
) -> tuple[Path, Path]:
    """Flickr8k captions CSV (image,caption) -> train.jsonl (one row per caption, first `n_train`
    images in sorted name order) and val.jsonl (one row per image of the next `n_val`, with all
    captions as `references`). Image paths are written relative to `out_dir`."""
    caps: dict[str, list[str]] = {}
    with open(captions_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{captions_csv}: expected a header 'image,caption', got {reader.fieldnames}")
        for r in reader:
            caps.setdefault(r["image"].strip(), []).append(_clean_caption(r["caption"]))
    images_dir, out = Path(images_dir), Path(out_dir)
    missing = [n for n in caps if not (images_dir / n).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} images named in {captions_csv} are not in {images_dir} "
            f"(first: {missing[0]}); point images_dir at the folder holding them"
        )
    names = sorted(caps)
    if len(names) < n_train + n_val:
        raise ValueError(f"{captions_csv} has {len(names)} images, fewer than {n_train}+{n_val}")
    out.mkdir(parents=True, exist_ok=True)

    def rel(n: str) -> str:
        return os.path.relpath((images_dir / n).resolve(), out.resolve())

    train = [{"image": rel(n), "instruction": instruction, "output": c} for n in names[:n_train] for c in caps[n]]
    val = [
        {"image": rel(n), "instruction": instruction, "output": caps[n][0], "references": caps[n]}
        for n in names[n_train : n_train + n_val]
    ]
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "val.jsonl", val)
    return out / "train.jsonl", out / "val.jsonl"


VQA_SUFFIX = " Answer with one word."


def easyvqa_to_jsonl(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The `easy-vqa` pip package -> train.jsonl / test.jsonl with {"image", "instruction",
    "output", "choices"} (choices: the 13 possible answers, for accuracy scoring)."""
    try:
        import easy_vqa
    except ImportError as e:  # a data package, imported only by this converter
        raise ValueError("easy-VQA data comes from a pip package: `pip install easy-vqa==1.0`") from e
    answers = list(easy_vqa.get_answers())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, qs, ims in (
        ("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ):
        questions, ans, ids = qs
        resolved = {i: str(Path(p).resolve()) for i, p in ims.items()}
        rows = [
            {"image": resolved[i], "instruction": q[:1].upper() + q[1:] + VQA_SUFFIX, "output": a, "choices": answers}
            for q, a, i in zip(questions, ans, ids)
        ]
        _write_jsonl(out / f"{split}.jsonl", rows)
        paths.append(out / f"{split}.jsonl")
    return paths[0], paths[1]
