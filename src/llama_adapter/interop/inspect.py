"""What an adapter file holds (config, tensors, size, the base it needs) in any format, and listing a folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .common import (
    OFFICIAL,
    OFFICIAL_DEFAULT_LEN,
    OFFICIAL_GATE,
    OFFICIAL_QUERY,
    OURS,
    PEFT,
    PEFT_KEY,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_BIN,
    base_summary,
    detect_format,
)
from .official import official_state
from .ours import read_ours_config
from .peft import peft_config

Shapes = dict[str, dict[str, Any]]


def _shapes(path: Path) -> Shapes:
    if path.suffix == ".safetensors":
        return checkpoint.safetensors_shapes(path)
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in official_state(path).items()
        if isinstance(v, torch.Tensor)
    }


def _ours_info(p: Path) -> dict[str, Any]:
    meta, _, base = read_ours_config(p)
    return {
        "config": meta["adapter"],
        "base": {**base_summary(base), "fingerprint": meta["base"].get("fingerprint", base.fingerprint())},
        "metadata": {k: v for k, v in meta.items() if k not in ("adapter", "base")},
    }


def _peft_info(p: Path, tensors: Shapes) -> dict[str, Any]:
    pc = peft_config(p)
    layers = sorted(int(m.group(1)) for k in tensors if (m := PEFT_KEY.match(k)) and m.group(2) == "prompt")
    width = next((t["shape"][-1] for k, t in tensors.items() if k.endswith("adaption_prompt") and t["shape"]), None)
    base = {
        "name": pc.get("base_model_name_or_path"),
        "fingerprint": None,
        "dim": width,
        "min_layers": (layers[-1] + 1) if layers else None,
        "adapted_layers": layers,
        "model_type": "llama" if pc.get("target_modules") in (None, "self_attn") else "not llama",
    }
    return {"config": pc, "base": base}


def _official_info(tensors: Shapes) -> dict[str, Any]:
    query = tensors.get(OFFICIAL_QUERY)
    if query is not None and len(query["shape"]) != 2:
        query = None  # not [L*K, dim]: reading it (convert) says what is wrong
    gates = {int(m.group(1)): t for k, t in tensors.items() if (m := OFFICIAL_GATE.match(k))}
    heads = {math.prod(t["shape"]) for t in gates.values()}
    rows = query["shape"][0] if query else 0
    K = OFFICIAL_DEFAULT_LEN if rows % OFFICIAL_DEFAULT_LEN == 0 else None
    config = {
        "adapter_len": K,
        "adapter_layers": rows // K if K else None,
        "note": "K assumed 10 as the official example.py does; convert checks the split against a base",
        "gate_layers": sorted(gates),
    }
    base = {
        "name": "LLaMA (Meta format)",
        "fingerprint": None,
        "dim": query["shape"][1] if query else None,
        "n_heads": max(heads) if heads else None,
        "min_layers": (max(gates) + 1) if gates else None,
    }
    return {"config": config, "base": base}


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Config, tensor names/shapes, size on disk, trainable parameter count and the base the adapter
    needs (name, fingerprint where recorded, dims) of an adapter in any supported format."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == OFFICIAL:
        files = [p]
    else:
        files = [p / ADAPTER_CONFIG] + [
            p / n for n in (ADAPTER_WEIGHTS, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (p / n).is_file()
        ]
    weights = [f for f in files if f.suffix != ".json"]
    if not weights:
        raise ValueError(f"{p}: adapter weights missing (expected {ADAPTER_WEIGHTS} or {PEFT_WEIGHTS})")
    tensors = _shapes(weights[0])
    info: dict[str, Any] = {
        "path": str(p),
        "format": fmt,
        "size_bytes": sum(f.stat().st_size for f in files),
        "trainable_parameters": sum(math.prod(t["shape"]) for t in tensors.values()),
        "tensors": tensors,
    }
    if fmt == OURS:
        return info | _ours_info(p)
    if fmt == PEFT:
        return info | _peft_info(p, tensors)
    return info | _official_info(tensors)


def list_adapters(root: str | Path) -> list[dict[str, Any]]:
    """`inspect_adapter` of every adapter in `root` (itself, its sub-directories and official .pth files),
    sorted by name; entries that fail to read are listed with an "error" instead of stopping the scan."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    candidates = [root] if (root / ADAPTER_CONFIG).is_file() else []
    for child in sorted(root.iterdir()):
        if (child.is_dir() and (child / ADAPTER_CONFIG).is_file()) or (child.is_file() and child.suffix == ".pth"):
            candidates.append(child)
    out = []
    for c in candidates:
        try:
            out.append({"name": c.name, **inspect_adapter(c)})
        except (ValueError, OSError) as e:
            out.append({"name": c.name, "path": str(c), "error": str(e)})
    return out
