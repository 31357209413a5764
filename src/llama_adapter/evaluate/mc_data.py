"""Multiple-choice data: `MCItem` (question, choices, answer index, optional context and image) from

- ScienceQA (`load_scienceqa`): `problems.json` + `pid_splits.json`, one split; images (optional) at
  `IMAGES/<split>/<pid>/<image>` as in the official release;
- easy-VQA (`load_easyvqa`): the `easy-vqa==1.0` pip package's questions with their image files; the
  candidates are either the package's whole answer vocabulary (13) or the answers of the question's
  kind (yes/no, shape, colour; the kind is the group holding the gold answer, which the question's
  wording already gives away: "does the image contain...", "what shape...", "what color...");
- any JSONL of `{"question", "choices", "answer"}` (`load_mc_jsonl`): answer = 0-based index, a
  letter, or the text of a choice; optional `context`, `image` (relative to the file), `id`.

Bad items (answer index out of range, empty choices, an image missing on disk, ...) raise a
`ValueError` naming the file and line (or ScienceQA pid); with `skip_bad=True` they are skipped,
and every skipped item is counted and listed in the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import easy_vqa  # a declared dependency (pyproject); importing it reads nothing yet

from .items import BadItem, Items, collect, jsonl_lines, need_file, resolve_image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EASYVQA_KINDS = {"yes/no": ("yes", "no"), "shape": ("circle", "rectangle", "triangle")}  # the rest: colour


@dataclass
class MCItem:
    id: str
    question: str
    choices: list[str]
    answer: int
    context: str = ""
    image: str | None = None
    meta: dict[str, str] = field(default_factory=dict)  # groups for the per-group accuracy table


MCData = Items  # Items[MCItem]: what every multiple-choice loader returns


def check_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise BadItem("'choices' is empty or not a list; give at least two answer options")
    if len(choices) < 2:
        raise BadItem(f"only one choice {choices!r}; a multiple-choice question needs at least two")
    if len(choices) > len(LETTERS):
        raise BadItem(f"{len(choices)} choices; at most {len(LETTERS)} can be lettered A-Z")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadItem(f"every choice must be a non-empty string, got {choices!r}")
    return [c.strip() for c in choices]


def answer_index(answer: Any, choices: list[str]) -> int:
    """0-based index from an int index, the exact text of a choice, or a letter."""
    if isinstance(answer, bool) or answer is None:
        raise BadItem(f"'answer' must be an index, a letter or a choice's text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise BadItem(
                f"answer index {answer} out of range for {len(choices)} choices (0-based: 0..{len(choices) - 1})"
            )
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if a in choices:
            return choices.index(a)
        m = re.fullmatch(r"\(?([A-Za-z])\)?", a)
        if m:
            i = LETTERS.index(m.group(1).upper())
            if i >= len(choices):
                raise BadItem(
                    f"answer letter {a!r} out of range for {len(choices)} choices (A..{LETTERS[len(choices) - 1]})"
                )
            return i
        raise BadItem(f"answer {answer!r} is neither a letter nor the text of one of the choices {choices!r}")
    raise BadItem(f"'answer' must be an index, a letter or a choice's text, got {type(answer).__name__}")


def load_mc_jsonl(
    path: str | Path, *, images: str | Path | None = None, skip_bad: bool = False, limit: int | None = None
) -> Items[MCItem]:
    """JSONL of {question, choices, answer[, context, image, id]}; image paths relative to `images`
    (default: the file's folder)."""
    path = need_file(path, "--format jsonl")
    root = Path(images) if images else path.parent
    data: Items[MCItem] = Items([])
    for lineno, where, parse in jsonl_lines(path):
        if limit is not None and len(data.items) >= limit:
            break

        def make(parse: Any = parse, lineno: int = lineno) -> MCItem:
            row = parse()
            q = row.get("question")
            if not isinstance(q, str) or not q.strip():
                raise BadItem("missing or empty 'question'")
            if "choices" not in row:
                raise BadItem("missing 'choices'")
            choices = check_choices(row["choices"])
            if "answer" not in row:
                raise BadItem("missing 'answer'")
            ans = answer_index(row["answer"], choices)
            ctx = row.get("context") or ""
            if not isinstance(ctx, str):
                raise BadItem(f"'context' must be a string, got {type(ctx).__name__}")
            img = resolve_image(row.get("image"), root, f"relative paths are relative to {root}")
            meta = {k: str(row[k]) for k in ("subject", "category") if k in row}
            return MCItem(str(row.get("id", lineno)), q.strip(), choices, ans, ctx.strip(), img, meta)

        collect(where, skip_bad, data, make)
    if not data.items and not data.skipped:
        raise ValueError(f"{path}: no questions; each line must be a {{question, choices, answer}} object")
    return data


def _sqa_paths(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        problems, splits = path / "problems.json", path / "pid_splits.json"
    else:
        problems, splits = path, path.parent / "pid_splits.json"
    for p in (problems, splits):
        if not p.is_file():
            raise FileNotFoundError(
                f"ScienceQA file {p} not found; point --data at the folder holding problems.json and pid_splits.json"
            )
    return problems, splits


def _read_sqa(path: Path, split: str) -> tuple[Path, Path, dict[str, Any], list[Any]]:
    problems_path, splits_path = _sqa_paths(path)
    try:
        problems = json.loads(problems_path.read_text(encoding="utf-8"))
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in ScienceQA files ({e}); re-download problems.json / pid_splits.json") from e
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{problems_path} and {splits_path} must each hold a JSON object keyed by pid / split")
    if split not in splits:
        raise ValueError(f"{splits_path} has no split {split!r}; choose one of: {', '.join(splits)}")
    return problems_path, splits_path, problems, splits[split]


def _sqa_item(pid: str, p: dict[str, Any], split: str, images: str | Path | None) -> MCItem:
    q = p.get("question")
    if not isinstance(q, str) or not q.strip():
        raise BadItem("missing or empty 'question'")
    choices = check_choices(p.get("choices"))
    if not isinstance(p.get("answer"), int):
        raise BadItem(f"'answer' must be a 0-based index, got {p.get('answer')!r}")
    ans = answer_index(p["answer"], choices)
    img = None
    if p.get("image") and images is not None:
        folder = Path(images) / str(p.get("split") or split) / pid
        img = resolve_image(p["image"], folder, f"expected IMAGES/<split>/<pid>/{p['image']}")
    hint = (p.get("hint") or "").strip()
    modality = "IMG" if p.get("image") else ("TXT" if hint else "NO")
    grade = str(p.get("grade") or "")
    g = int(grade[5:]) if grade.startswith("grade") and grade[5:].isdigit() else None
    meta = {"subject": str(p.get("subject") or "?"), "context": modality}
    if g is not None:
        meta["grade"] = "G1-6" if g <= 6 else "G7-12"
    return MCItem(pid, q.strip(), choices, ans, hint, img, meta)


def load_scienceqa(
    path: str | Path,
    split: str = "val",
    *,
    images: str | Path | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> Items[MCItem]:
    """ScienceQA `problems.json` (+ `pid_splits.json` next to it) -> the questions of `split` in
    pid_splits order. With `images` (the release's `images/` folder) image questions get
    `IMAGES/<split>/<pid>/<image>`; without it they are evaluated text-only (noted in the report)."""
    problems_path, splits_path, problems, pids = _read_sqa(Path(path), split)
    data: Items[MCItem] = Items([])
    n_images_ignored = 0
    for pid in map(str, pids):
        if limit is not None and len(data.items) >= limit:
            break

        def make(pid: str = pid) -> MCItem:
            if pid not in problems:
                raise BadItem(f"listed in {splits_path.name}[{split!r}] but not in {problems_path.name}")
            return _sqa_item(pid, problems[pid], split, images)

        n = len(data.items)
        collect(f"{problems_path}: pid {pid}", skip_bad, data, make)
        if len(data.items) > n and images is None and problems[pid].get("image"):
            n_images_ignored += 1
    if n_images_ignored:
        data.notes.append(
            f"{n_images_ignored} questions have an image that was not used (no --images folder): evaluated text-only"
        )
    return data


def easyvqa_kind(answer: str) -> str:
    for kind, answers in EASYVQA_KINDS.items():
        if answer in answers:
            return kind
    return "color"


def load_easyvqa(split: str = "test", *, candidates: str = "kind", limit: int | None = None) -> Items[MCItem]:
    """easy-VQA questions as image multiple choice (see the module docstring for `candidates`)."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split {split!r}: choose train or test")
    if candidates not in ("all", "kind"):
        raise ValueError(
            f"candidates={candidates!r}: choose 'all' (13 answers) or 'kind' (answers of the question's kind)"
        )
    qs, ans, ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    vocab = list(easy_vqa.get_answers())
    data: Items[MCItem] = Items([])
    for n, (q, a, i) in enumerate(zip(qs, ans, ids)):
        if limit is not None and n >= limit:
            break
        kind = easyvqa_kind(a)
        choices = vocab if candidates == "all" else [v for v in vocab if easyvqa_kind(v) == kind]
        item = MCItem(f"{split}-{n}", q[:1].upper() + q[1:], list(choices), choices.index(a), "", str(paths[i]))
        item.meta["kind"] = kind
        data.items.append(item)
    data.notes.append(
        f"easy-VQA {split}: candidates={candidates} ({'13 answers' if candidates == 'all' else 'per kind'})"
    )
    return data


def load_mc(fmt: str, data: str | Path | None, **kw: Any) -> Items[MCItem]:
    """The multiple-choice items of `--format fmt` (scienceqa, easyvqa or jsonl)."""
    split = kw.pop("split", None)
    candidates = kw.pop("candidates", "kind")
    if fmt == "scienceqa":
        if not data:
            raise ValueError("--format scienceqa needs --data")
        return load_scienceqa(data, split or "val", **kw)
    if fmt == "easyvqa":
        return load_easyvqa(split or "test", candidates=candidates, limit=kw.get("limit"))
    if fmt == "jsonl":
        return load_mc_jsonl(need_file(data, "--format jsonl"), **kw)
    raise ValueError(f"--format {fmt} is not a multiple-choice format; use scienceqa, easyvqa or jsonl with --task mc")
