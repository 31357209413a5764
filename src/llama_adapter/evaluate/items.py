"""What every evaluation reader shares: one rule for a bad item (a one-line `ValueError` naming
`file:line`, or with `skip_bad` a counted skip), JSONL lines as objects, image paths relative to
the data file, and the progress bar."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class BadItem(Exception):
    """An item the reader cannot use; `collect` turns it into a ValueError or a counted skip."""


@dataclass
class Items(Generic[T]):
    """What a reader returns: the usable items, the bad ones it skipped, and notes for the report."""

    items: list[T]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"where", "reason"}
    notes: list[str] = field(default_factory=list)


def collect(where: str, skip_bad: bool, data: Items[T], make: Callable[[], T]) -> None:
    """Append `make()` to `data.items`; a `BadItem` becomes a one-line ValueError naming `where`,
    or, with `skip_bad`, an entry in `data.skipped`."""
    try:
        data.items.append(make())
    except BadItem as e:
        if not skip_bad:
            raise ValueError(f"{where}: {e}; fix the item or pass --skip-bad to skip and count such items") from None
        data.skipped.append({"where": where, "reason": str(e)})


def jsonl_lines(path: Path) -> Iterator[tuple[int, str, Callable[[], dict[str, Any]]]]:
    """(line number, `file:line`, a function parsing that line into a JSON object or raising
    `BadItem`) for every non-blank line; parsing is deferred so that `collect` decides what a
    malformed line costs."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, f"{path}:{lineno}", lambda line=line: parse_object(line)


def parse_object(line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadItem(f"invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadItem(f"expected a JSON object, got {type(row).__name__}")
    return row


def resolve_image(img: Any, root: Path, hint: str, key: str = "image") -> str | None:
    """An item's image as an absolute path string (None when it has none); relative paths start
    at `root`. `hint` says where relative paths are looked up, for the error."""
    if img in (None, ""):
        return None
    if not isinstance(img, str):
        raise BadItem(f"'{key}' must be a path string or null, got {img!r}")
    p = Path(img)
    if not p.is_absolute():
        p = root / p
    if not p.is_file():
        raise BadItem(f"image {p} not found on disk ({hint})")
    return str(p)


def need_file(path: str | Path | None, what: str) -> Path:
    if not path:
        raise ValueError(f"{what} needs --data")
    p = Path(path)
    if p.is_dir():
        hint = next((f" (e.g. {f})" for f in sorted(p.glob("*.json*"))), "")
        raise ValueError(f"--data {p} is a folder; give the data file itself{hint}")
    if not p.is_file():
        raise FileNotFoundError(f"evaluation file not found: {p}")
    return p


def bar(total: int, desc: str, enabled: bool) -> tqdm:
    """Progress on stderr, so reports on stdout stay clean."""
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not enabled)
