"""What `generate` is asked to do: prompts, each with at most one non-text input (image, audio,
video or point cloud), from repeated flags (`--prompt P --image F --audio none ...`) or a JSONL file
(`{"prompt": ..., "video": path}`). Paths are checked before any model loads; the files are read
(`multimodal.read_input`) once the model is known to take them, so a bad file fails before any work
and names itself."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .multimodal import MODALITIES, NONE_WORDS, Input, read_input


@dataclass
class PromptRow:
    prompt: str
    modality: str | None = None  # the row's input, if any
    path: str | None = None

    def record(self, output: str) -> dict[str, Any]:
        """The row as a JSONL result line (always with "image", as before other modalities)."""
        rec: dict[str, Any] = {"prompt": self.prompt, "image": self.path if self.modality == "image" else None}
        if self.modality not in (None, "image"):
            rec[self.modality] = self.path
        return {**rec, "output": output}

    @property
    def tag(self) -> str:
        return f" [{self.modality} {self.path}]" if self.modality else ""


def _flag_values(args: Any, n: int) -> list[dict[str, str]]:
    """Per row, {modality: path} from the repeated modality flags (each given once for every prompt,
    or once per prompt in order, 'none'/'-' for a row without)."""
    rows: list[dict[str, str]] = [{} for _ in range(n)]
    for m in MODALITIES:
        given = getattr(args, m, None) or []
        if len(given) == 1:
            given = given * n
        if given and len(given) != n:
            raise ValueError(
                f"{len(getattr(args, m))} --{m} for {n} --prompt: give one --{m} for all prompts or one per --prompt "
                f"in the same order ({' or '.join(repr(x) for x in NONE_WORDS)} for a row without)"
            )
        for i, v in enumerate(given):
            if v is not None and v.lower() not in NONE_WORDS:
                rows[i][m] = v
    return rows


def _jsonl_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    if not path.is_file():
        raise ValueError(f"--batch {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{n}: each line needs {{"prompt": "...", "image": path or null}}')
        inputs = {}
        for m in MODALITIES:
            v = row.get(m)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{path}:{n}: {m!r} must be a path string or null, got {v!r}")
            if v:
                p = Path(v)
                inputs[m] = str(p if p.is_absolute() else path.parent / p)  # relative to the file
        out.append((row["prompt"], inputs))
    if not out:
        raise ValueError(f"--batch {path} holds no rows")
    return out


def generate_rows(args: Any) -> tuple[list[PromptRow], bool]:
    """(rows, whether they came from --batch), every input path checked to exist."""
    flags = [f"--{m}" for m in MODALITIES if getattr(args, m, None)]
    if args.batch:
        if args.prompt or flags:
            raise ValueError(f"--batch FILE replaces --prompt/{'/'.join(flags) or '--image'}; give one or the other")
        pairs = _jsonl_rows(Path(args.batch))
    else:
        if not args.prompt:
            raise ValueError("give --prompt TEXT (repeat it for a batch) or --batch FILE.jsonl")
        prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
        pairs = list(zip(prompts, _flag_values(args, len(prompts))))
    rows = []
    for i, (prompt, inputs) in enumerate(pairs):
        if len(inputs) > 1:
            raise ValueError(f"row {i} has {' and '.join(inputs)} inputs; give at most one non-text input per row")
        m, p = next(iter(inputs.items()), (None, None))
        if p is not None and not Path(p).exists():
            raise ValueError(f"{m} {p} (row {i}) not found; check the path")
        rows.append(PromptRow(prompt, m, p))
    return rows, bool(args.batch)


def open_inputs(stack: Any, name: str | None, rows: list[PromptRow]) -> list[Input | None]:
    """Check that model `name` takes each row's modality, then read every file."""
    for r in rows:
        stack.check_input(name, r.modality)
    return [None if r.modality is None else read_input(r.modality, r.path) for r in rows]
