"""Hugging Face checkpoints: config.json (LlamaConfig) + safetensors (single file or sharded), read and written."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import Config
from ..model import LLaMA
from .build import Lazy, build_model
from .common import (
    CheckpointNotFoundError,
    ModelSource,
    chat_template_name,
    check_numbers,
    new_config,
    one_line,
    read_json,
    with_config,
)
from .keymaps import HF_KEYS

_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
_OPTIONAL = {"num_key_value_heads": int, "max_position_embeddings": int, "head_dim": int, "rms_norm_eps": float,
             "rope_theta": float}  # fmt: skip


def _check_fields(d: dict[str, Any], where: str) -> None:
    check_numbers(d, {**dict.fromkeys(_REQUIRED, int), **_OPTIONAL}, where, required=_REQUIRED)
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_scaling is {rope!r}, expected an object")


def config_from_hf(d: dict[str, Any], name: str = "custom", where: str = "config.json") -> Config:
    """A transformers LlamaConfig dict (config.json) -> Config."""
    d = {k: v for k, v in d.items() if v is not None}  # null: the default
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; only 'llama' checkpoints load")
    _check_fields(d, where)
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError(f"{where}: only silu activations without attention/mlp biases are supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(not isinstance(rope.get(k), (int, float)) for k in keys):
            raise ValueError(f"{where}: llama3 rope_scaling needs numbers {', '.join(keys)}")
        scaling = {k: rope[k] for k in keys}
    elif rope_type not in ("default", None):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported; supported: default, llama3")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim")
    return new_config(
        where,
        name=name,
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        vocab_size=d["vocab_size"],
        hidden_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        head_dim_override=head_dim if head_dim and head_dim * n_heads != dim else None,
    )


def config_to_hf(c: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Config -> a transformers LlamaConfig dict (config.json)."""
    scaling = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_config(d: Path, name: str) -> Config:
    """The Config of a Hugging Face model directory, from its config.json alone."""
    return config_from_hf(read_json(d / "config.json"), name=name, where=str(d / "config.json"))


# ----------------------------------------------------------------------------------------------------- read
def _weight_files(d: Path) -> list[str]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: no weight_map of tensor name -> file name; the file is damaged")
        files = sorted(set(weight_map.values()))
        for fname in files:
            if not (d / fname).exists():
                raise CheckpointNotFoundError(f"{d / fname}: listed in {index.name} but missing; re-download it")
        return files
    if (d / "model.safetensors").exists():
        return ["model.safetensors"]
    return sorted(p.name for p in d.glob("*.safetensors"))


def _reader(f: Any, name: str, path: Path) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        try:
            return f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{path}: tensor {name!r} cannot be read ({one_line(e)}); the file is damaged") from e

    return read


def _damaged(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({one_line(e)}); truncated or damaged file")


def _open_safetensors(stack: ExitStack, path: Path) -> list[Lazy]:
    try:
        f = stack.enter_context(safe_open(str(path), framework="pt"))
        return [(name, tuple(f.get_slice(name).get_shape()), _reader(f, name, path)) for name in f.keys()]
    except SafetensorError as e:
        raise _damaged(path, e) from e


def safetensors_shapes(path: Path) -> dict[str, dict[str, Any]]:
    """{name: {"shape", "dtype"}} of a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": str(f.get_slice(k).get_dtype())}
                    for k in f.keys()}  # fmt: skip
    except SafetensorError as e:
        raise _damaged(path, e) from e


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a damaged file is a one-line ValueError naming it."""
    with ExitStack() as stack:
        return {name: read() for name, _, read in _open_safetensors(stack, path)}


def load_hf(source: ModelSource, config: Config | None, **kw: Any) -> tuple[LLaMA, str | None]:
    d = source.path
    config = with_config(config, hf_config(d, source.name), source.name)
    with ExitStack() as stack:
        tensors = [t for fname in _weight_files(d) for t in _open_safetensors(stack, d / fname)]
        model = build_model(source, config, HF_KEYS, tensors, **kw)
    template = None
    tc = d / "tokenizer_config.json"
    if tc.exists():
        t = read_json(tc).get("chat_template")
        template = chat_template_name(t if isinstance(t, str) else json.dumps(t))
    return model, template


# ---------------------------------------------------------------------------------------------------- write
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {size!r}: expected bytes or e.g. '500MB', '5GB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    if shard:
        yield shard


def _hf_tensors(model: LLaMA) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("output.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    for ours, t in sd.items():
        if ours == "inv_freq":
            continue
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger (e.g. memory-mapped) buffer; safetensors refuses shared storage
        tensors[HF_KEYS.theirs(ours)] = t
    return tensors


def save_hf(model: LLaMA, out_dir: str | Path, *, shard_size: int | str = "5GB") -> None:
    """Write a Hugging Face checkpoint: config.json (LlamaConfig) + model.safetensors (or shards with
    model.safetensors.index.json), HF tensor names in HF layout. Loads with LlamaForCausalLM.from_pretrained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(model)
    dtype = next(reversed(tensors.values())).dtype if tensors else torch.float32
    shards = list(_shards(tensors, _parse_size(shard_size)))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, fname in zip(shards, names):
        tmp = out / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: fname for shard, fname in zip(shards, names) for name in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    elif (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n", encoding="utf-8")
