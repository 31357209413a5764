"""Reading OCR and MME benchmark JSONL: the files `data make-ocr` / `make-mme` write, or any file
in the same image-text format, one question per line:

    {"image": path, "instruction" or "question": text, "answers": [text, ...] or "answer" / "output": text,
     "subtask": name, optional "id", "pair" (MME: the questions of one image), "control_image" (OCR)}

Image paths may be relative to the file. A line with a missing image, answers of the wrong type,
an unknown subtask or broken JSON raises one `ValueError` naming `file:line`; with `skip_bad` it
is skipped and counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .items import BadItem, Items, collect, jsonl_lines, need_file, resolve_image
from .mme import MME_SUBTASKS
from .ocr import OCR_SUBTASKS

SUBTASKS = {"ocr": (*OCR_SUBTASKS, "text"), "mme": MME_SUBTASKS}  # "text": OCR lines that name no subtask
GROUP_KEYS = ("style", "size")  # drawn attributes reported as groups next to the subtasks


@dataclass
class BenchItem:
    id: str
    image: str
    question: str
    answers: list[str]
    subtask: str
    pair: str = ""  # MME: questions of one image share it (accuracy+)
    control: str | None = None  # OCR: the same photo without the text
    meta: dict[str, str] = field(default_factory=dict)


def _question(row: dict[str, Any]) -> str:
    q = row.get("instruction", row.get("question"))
    if not isinstance(q, str) or not q.strip():
        raise BadItem("missing or empty 'instruction' (or 'question')")
    return q.strip()


def _answers(row: dict[str, Any], task: str) -> list[str]:
    if "answers" in row:
        a = row["answers"]
        if not isinstance(a, list) or not a or not all(isinstance(x, str) and x.strip() for x in a):
            got = type(a).__name__ if not isinstance(a, list) else repr(a)[:60]
            raise BadItem(f"'answers' must be a non-empty list of strings, got {got}")
        answers = [x.strip() for x in a]
    else:
        a = row.get("answer", row.get("output"))
        if not isinstance(a, str) or not a.strip():
            raise BadItem("missing 'answers' (a list of strings) or 'answer' / 'output' (a string)")
        answers = [a.strip()]
    if task == "mme" and (len(answers) != 1 or answers[0].lower() not in ("yes", "no")):
        raise BadItem(f"an MME answer is 'yes' or 'no', got {answers!r}")
    return answers


def _subtask(row: dict[str, Any], task: str) -> str:
    st = row.get("subtask")
    if st is None and task == "ocr":
        return "text"
    if not isinstance(st, str) or st not in SUBTASKS[task]:
        raise BadItem(f"unknown subtask {st!r} for --task {task}; use one of {', '.join(SUBTASKS[task])}")
    return st


def bench_item(row: dict[str, Any], task: str, root: Path, lineno: int) -> BenchItem:
    """One question from a parsed line (raises `BadItem` on anything unusable)."""
    question, answers, subtask = _question(row), _answers(row, task), _subtask(row, task)
    if "image" not in row:
        raise BadItem("missing 'image'; every benchmark question is about an image")
    hint = f"relative paths are relative to {root}"
    image = resolve_image(row["image"], root, hint)
    if image is None:
        raise BadItem("'image' is empty; every benchmark question is about an image")
    control = resolve_image(row.get("control_image"), root, hint, key="control_image") if task == "ocr" else None
    pair = row.get("pair", image)
    if task == "mme" and not isinstance(pair, str):
        raise BadItem(f"'pair' must be a string, got {type(pair).__name__}")
    meta = {k: str(row[k]) for k in GROUP_KEYS if k in row}
    if task == "mme":
        answers = [answers[0].lower()]
    return BenchItem(str(row.get("id", lineno)), image, question, answers, subtask, pair, control, meta)


def load_bench(
    path: str | Path | None, task: str, *, skip_bad: bool = False, limit: int | None = None
) -> Items[BenchItem]:
    """The questions of an OCR (`task="ocr"`) or MME (`task="mme"`) benchmark file."""
    if task not in SUBTASKS:
        raise ValueError(f"benchmark task {task!r}: choose ocr or mme")
    path = need_file(path, f"--task {task}")
    data: Items[BenchItem] = Items([])
    for lineno, where, parse in jsonl_lines(path):
        if limit is not None and len(data.items) >= limit:
            break
        make = lambda parse=parse, lineno=lineno: bench_item(parse(), task, path.parent, lineno)
        collect(where, skip_bad, data, make)
    if not data.items and not data.skipped:
        raise ValueError(f"{path}: no questions; each line must be an image-text JSONL object")
    if task == "mme":
        data.notes += _pair_notes(data.items)
    return data


def _pair_notes(items: list[BenchItem]) -> list[str]:
    """MME pairs a yes and a no question per image; say so when the file (or --limit, or a skipped
    line) breaks pairs, since accuracy+ then counts an image on fewer questions."""
    by_pair: dict[str, list[str]] = {}
    for it in items:
        by_pair.setdefault(it.pair, []).append(it.answers[0])
    odd = [p for p, a in by_pair.items() if sorted(a) != ["no", "yes"]]
    if not odd:
        return []
    return [f"{len(odd)} of {len(by_pair)} images do not have one yes and one no question (first: {odd[0]})"]
