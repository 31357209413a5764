"""Our adapter files (adapter_config.json + adapter.safetensors) as `PromptTensors`, for conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .. import checkpoint
from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT_VERSION, _atomic_write, read_adapter_config
from ..config import AdapterConfig, Config
from .common import OURS, PromptTensors, require_v1_text


def read_ours_config(adapter_dir: str | Path) -> tuple[dict[str, Any], AdapterConfig, Config]:
    """adapter_config.json of ours: the raw dict, the AdapterConfig and the base Config it records."""
    meta = read_adapter_config(adapter_dir)
    adapter, base = meta.get("adapter"), meta.get("base")
    where = Path(adapter_dir) / ADAPTER_CONFIG
    if not isinstance(adapter, dict) or not isinstance(base, dict) or not isinstance(base.get("config"), dict):
        raise ValueError(f"{where}: needs an 'adapter' object and a 'base' object with a 'config'; damaged file")
    try:
        return meta, AdapterConfig.from_dict(adapter), Config.from_dict(base["config"])
    except TypeError as e:  # a field of the wrong type
        raise ValueError(f"{where}: {e}; the file is damaged") from e


def read_ours(adapter_dir: str | Path) -> PromptTensors:
    _, cfg, base = read_ours_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"adapter weights {path} not found")
    sd = checkpoint.load_safetensors(path)
    require_v1_text(cfg, "this conversion")
    for key in ("adapter.prompts", "adapter.gates"):
        if key not in sd:
            raise ValueError(f"{path}: missing tensor {key!r}; the file has {sorted(sd)}")
    return PromptTensors(sd["adapter.prompts"].float(), sd["adapter.gates"].float(), cfg, base)


def write_ours(pt: PromptTensors, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """The same files `adapter.save_adapter` writes (loadable by `load_adapter`)."""
    out = Path(out_dir)
    c, cfg = pt.base, pt.config
    L, K = cfg.adapter_layers, cfg.adapter_len
    if tuple(pt.prompts.shape) != (L * K, c.dim) or tuple(pt.gates.shape) != (L, c.n_heads):
        raise ValueError(f"prompts {list(pt.prompts.shape)} / gates {list(pt.gates.shape)} do not fit K={K}, L={L}")
    tensors = {"adapter.prompts": pt.prompts.float().contiguous(), "adapter.gates": pt.gates.float().contiguous()}
    meta = {
        "format": OURS,
        "format_version": FORMAT_VERSION,
        "adapter": cfg.to_dict(),
        "base": {"name": c.name, "fingerprint": c.fingerprint(), "config": c.to_dict()},
        "dtype": "float32",
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        **(metadata or {}),
    }
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))
    return out
