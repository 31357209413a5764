"""Adapter conversion between formats (via `PromptTensors`) and base-model export to Hugging Face."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..adapter import check_compatible
from ..config import Config
from ..model import LLaMA
from ..tokenizer import export_tokenizer
from .common import OFFICIAL, OURS, PEFT, PromptTensors, base_config, base_summary, detect_format
from .official import read_official, write_official
from .ours import read_ours, write_ours
from .peft import read_peft, write_peft

_QUANTISED = ("Q4", "Q5", "Q8", "Q2", "Q3", "Q6")


def read_any(
    src: str | Path,
    base: Config | LLaMA | str | Path | None = None,
    *,
    gate_activation: str | None = None,
    adapter_len: int | None = None,
) -> tuple[str, PromptTensors]:
    fmt = detect_format(src)
    if fmt == OFFICIAL:
        if base is None:
            raise ValueError(f"{src}: an official adapter file records no base; pass the Meta base model (--base)")
        return fmt, read_official(src, base, gate_activation=gate_activation or "identity", adapter_len=adapter_len)
    if gate_activation is not None and fmt == PEFT and gate_activation != "identity":
        raise ValueError("PEFT applies its gate without tanh; a PEFT import is always gate_activation='identity'")
    pt = read_peft(src, base) if fmt == PEFT else read_ours(src)
    if fmt == OURS and base is not None:
        check_compatible({"base": {"config": pt.base.to_dict()}}, base_config(base), where=str(src))
    return fmt, pt


def convert_adapter(
    src: str | Path,
    dst: str | Path,
    to: str = "ours",
    *,
    base: Config | LLaMA | str | Path | None = None,
    gate_activation: str | None = None,
    adapter_len: int | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Convert an adapter between ours ('ours' / 'llama-adapter'), PEFT ('peft') and the official v1
    '.pth' ('official'). `base` (a checkpoint path, Config or model) is needed for official files and for
    PEFT adapters whose base_model_name_or_path is not local. Returns a report: formats, exactness,
    the largest gate deviation and notes."""
    to = OURS if to in ("ours", OURS) else to
    if to not in (OURS, PEFT, OFFICIAL):
        raise ValueError(f"to={to!r}: choose 'ours', 'peft' or 'official'")
    fmt, pt = read_any(src, base, gate_activation=gate_activation, adapter_len=adapter_len)
    dev = 0.0
    if to == OURS:
        write_ours(pt, dst, {"converted_from": {"format": fmt, "path": str(src)}})
    elif to == PEFT:
        dev = write_peft(pt, dst, strict=strict)
    else:
        dev = write_official(pt, dst)
    notes = list(pt.notes)
    if to == PEFT and dev:
        notes.append(f"per-head gates averaged per layer (max deviation {dev:.3g})")
    return {
        "source": str(src),
        "from": fmt,
        "out": str(dst),
        "to": to,
        "exact": dev == 0.0,
        "max_gate_deviation": dev,
        "adapter_len": pt.config.adapter_len,
        "adapter_layers": pt.config.adapter_layers,
        "gate_activation": pt.config.gate_activation,
        "base": base_summary(pt.base),
        "notes": notes,
    }


def convert_base(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard_size: int | str = "5GB",
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """Any base checkpoint `checkpoint.load_model` reads (Meta, HF, llama2.c, GGUF, named) -> a Hugging
    Face directory (config.json + safetensors, LlamaForCausalLM layout) via `checkpoint.save_hf`, with its
    tokenizer (`tokenizer` or the one found next to `src`) written beside it by `tokenizer.export_tokenizer`,
    so the directory loads as a model on its own. A tokenizer that cannot be written is noted in the report."""
    source = checkpoint.resolve(src, tokenizer)
    model = checkpoint.load_model(src, dtype=dtype, tokenizer=tokenizer)
    out = Path(out_dir)
    checkpoint.save_hf(model, out, shard_size=shard_size)
    written, notes = [], []
    if source.tokenizer is None:
        notes.append("no tokenizer found next to the source; pass one (--tokenizer) to write it beside the weights")
    else:
        try:
            written = export_tokenizer(source.tokenizer, out)
        except ValueError as e:
            notes.append(f"tokenizer not exported: {e}")
    if source.format == "gguf" and any(q in source.path.name.upper() for q in _QUANTISED):
        notes.append("the source is quantised: the export holds its dequantised weights, not the original ones")
    return {
        "source": str(source.path),
        "format": source.format,
        "out": str(out),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_files": written,
        "base": base_summary(model.config),
        "notes": notes,
    }
