"""What every checkpoint format shares: where a model is (`ModelSource`), its errors, JSON files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config

FORMATS = ("llama2c", "gguf", "hf", "meta")


class CheckpointNotFoundError(ValueError, FileNotFoundError):
    """A model path or name that points at nothing (both a ValueError and a FileNotFoundError)."""


@dataclass
class ModelSource:
    path: Path
    format: str  # one of FORMATS
    tokenizer: Path | None
    name: str


def one_line(e: BaseException) -> str:
    """A third-party error message fit to quote inside ours: one line, not too long."""
    return " ".join(str(e).split())[:200]


def read_json(path: Path) -> dict[str, Any]:
    """A file holding one JSON object; anything else is a one-line ValueError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise ValueError(
            f"{path}: not valid JSON ({one_line(e)}); the file is damaged, re-download or re-create it"
        ) from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(value).__name__}; the file is damaged")
    return value


def check_numbers(d: dict[str, Any], kinds: dict[str, type], where: str, required: tuple[str, ...] = ()) -> None:
    """Every key of `kinds` present in `d` holds an int (or, for float, any number); `required` ones exist."""
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} missing; the file is damaged or of another model type")
    for key, kind in kinds.items():
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int)):
            raise ValueError(f"{where}: {key} is {v!r}, expected {'a number' if kind is float else 'an integer'}")


def new_config(where: Path | str, **fields: Any) -> Config:
    """`Config(**fields)` for the shape a checkpoint declares. Each size must be a positive int below 2**24
    (2**31 for layers and context): far above any real model, small enough that a damaged header cannot
    make building the model (on the meta device) overflow or hang."""
    limits = {"dim": 2**24, "n_layers": 2**31, "n_heads": 2**24, "n_kv_heads": 2**24, "hidden_dim": 2**24,
              "vocab_size": 2**24, "head_dim_override": 2**24, "max_seq_len": 2**31}  # fmt: skip
    bad = {
        k: fields[k]
        for k, limit in limits.items()
        if fields.get(k) is not None
        and (isinstance(fields[k], bool) or not isinstance(fields[k], int) or not 0 < fields[k] < limit)
    }
    if bad:
        raise ValueError(f"{where}: the checkpoint declares implausible sizes {bad}; the file is damaged")
    return Config(**fields)


def with_config(config: Config | None, derived: Config, name: str) -> Config:
    """The config read from the checkpoint, unless the caller passed one (its shapes are checked later)."""
    if config is None:
        return dataclasses.replace(derived, name=name)
    return dataclasses.replace(config, extra=dict(config.extra))


def chat_template_name(jinja: str | None) -> str | None:
    """Our template name for a chat template shipped with a checkpoint (jinja text), if we know it."""
    if not isinstance(jinja, str) or not jinja:
        return None
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2")):
        if marker in jinja:
            return name
    return None
