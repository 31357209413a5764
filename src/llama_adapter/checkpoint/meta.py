"""Meta checkpoints (params.json + consolidated.NN.pth model-parallel shards) and safe `.pth` reading."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..model import LLaMA
from .build import Lazy, build_model
from .common import ModelSource, check_numbers, new_config, one_line, read_json, with_config
from .keymaps import META_KEYS, META_SPLIT

_PARAMS = {"dim": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "vocab_size": int, "multiple_of": int,
           "max_seq_len": int, "ffn_dim_multiplier": float, "norm_eps": float, "rope_theta": float,
           "rope_scaling_factor": float}  # fmt: skip
_SPLIT_RULES = [(re.compile(re.escape(k).replace(r"\{i\}", r"\d+") + r"\Z"), v) for k, v in META_SPLIT.items()]


def load_torch_file(path: Path) -> dict[str, Any]:
    """A `torch.save`d dict read with weights_only (tensors and plain containers, never arbitrary code),
    memory-mapped when the file allows it. Damaged files and pickled objects are one-line ValueErrors."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive (legacy format): no mmap
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(e))
        if unsafe:
            raise ValueError(
                f"{path}: holds arbitrary Python objects ({unsafe.group(1)}), not only tensors; it is not loaded "
                "for safety (unpickling could run code); re-save it as a plain state dict of tensors"
            ) from e
        raise ValueError(f"{path}: not a readable PyTorch file (damaged pickle); re-download or re-save it") from e
    except Exception as e:  # torch's zip reader, unpickler and mmap raise many types (OSError too) on damage
        reason = f"{type(e).__name__}: {one_line(e)}" if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch file ({reason}); it is truncated or damaged") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), found {type(sd).__name__}")
    return sd


def require_tensors(sd: dict[str, Any], path: Path, what: str) -> dict[str, torch.Tensor]:
    """`sd` itself when every value is a tensor; otherwise a ValueError saying `what` the file should hold."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: {k!r} is a {type(v).__name__}, not a tensor; {what}")
    return sd


def _meta_shard(path: Path) -> dict[str, torch.Tensor]:
    return require_tensors(load_torch_file(path), path, "a Meta consolidated.*.pth holds only tensors")


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_params(d: Path) -> dict[str, Any]:
    p = {k: v for k, v in read_json(d / "params.json").items() if v is not None}  # null: the default
    check_numbers(p, _PARAMS, str(d / "params.json"), required=("dim", "n_layers", "n_heads"))
    if p.get("multiple_of", 256) <= 0:
        raise ValueError(f"{d / 'params.json'}: multiple_of must be positive")
    return p


def meta_config(d: Path, name: str, shards: list[dict[str, torch.Tensor]] | None = None) -> Config:
    """The Config of a Meta checkpoint directory from its params.json. LLaMA 1 says vocab_size -1: then the
    classifier rows of the (memory-mapped) shards count, read from `shards` or from the files."""
    p = _read_params(d)
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if shards is None:
            shards = [_meta_shard(f) for f in sorted(d.glob("consolidated.*.pth"))]
        vocab = sum(s["output.weight"].shape[0] for s in shards if "output.weight" in s)
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = dict(factor=float(p.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)  # fmt: skip
    theta = float(p.get("rope_theta", 10000.0))
    default_len = 131072 if scaling else (8192 if theta >= 500000 else 2048)
    return new_config(
        d / "params.json",
        name=name,
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        vocab_size=vocab,
        hidden_dim=meta_hidden_dim(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(p.get("max_seq_len", default_len)),
        tie_embeddings=False,
    )


def _merged(d: Path, name: str, parts: list[torch.Tensor], dim: int) -> Lazy:
    """One tensor from its model-parallel shards (replicated ones are taken from the first shard)."""
    t0 = parts[0]
    rule = next((v for pat, v in _SPLIT_RULES if pat.match(name)), None)
    if len(parts) == 1 or rule is None or t0.dim() < 2:
        return name, tuple(t0.shape), lambda: t0
    cat_dim = rule if rule != "auto" else (0 if t0.shape[1] == dim else 1)  # [vocab/n, dim] in Llama 3
    others = {tuple(s for j, s in enumerate(t.shape) if j != cat_dim) for t in parts}
    if len(others) > 1 or any(t.dim() != t0.dim() for t in parts):
        raise ValueError(f"{d}: the shards of {name!r} have shapes {[list(t.shape) for t in parts]}, which do not fit")
    shape = list(t0.shape)
    shape[cat_dim] = sum(t.shape[cat_dim] for t in parts)
    return name, tuple(shape), lambda: torch.cat(parts, dim=cat_dim)


def load_meta(source: ModelSource, config: Config | None, **kw: Any) -> LLaMA:
    d = source.path
    files = sorted(d.glob("consolidated.*.pth"))
    shards = [_meta_shard(f) for f in files]
    derived = meta_config(d, source.name, shards)
    config = with_config(config, derived, source.name)
    tensors: list[Lazy] = []
    for name in shards[0]:
        parts = [s.get(name) for s in shards]
        if any(t is None for t in parts):
            raise ValueError(f"{d}: tensor {name!r} is in {files[0].name} but not in every shard; incomplete download?")
        tensors.append(_merged(d, name, parts, derived.dim))
    return build_model(source, config, META_KEYS, tensors, **kw)
