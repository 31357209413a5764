"""What every adapter format shares: names, the format-neutral `PromptTensors`, the base's Config, sniffing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedLLaMA
from ..config import AdapterConfig, Config
from ..model import LLaMA

OURS = "llama-adapter"
PEFT = "peft"
OFFICIAL = "official"
OFFICIAL_DEFAULT_LEN = 10  # example.py's ModelArgs.adapter_len; the released file uses it
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # what PeftModelForCausalLM.save_pretrained writes before the HF names
PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.adaption_(prompt|gate)\Z")
OFFICIAL_QUERY = "adapter_query.weight"
OFFICIAL_GATE = re.compile(r"^layers\.(\d+)\.attention\.gate\Z")


@dataclass
class PromptTensors:
    """One V1 prompt adapter, format-neutral."""

    prompts: torch.Tensor  # [L*K, dim], layer-major (row j*K + k: layer n-L+j, prompt k)
    gates: torch.Tensor  # [L, n_heads], raw (config.gate_activation is applied at run time)
    config: AdapterConfig
    base: Config
    notes: list[str] = field(default_factory=list)

    def activated_gates(self) -> torch.Tensor:
        return torch.tanh(self.gates) if self.config.gate_activation == "tanh" else self.gates

    @property
    def layers(self) -> list[int]:
        n = self.base.n_layers
        return list(range(n - self.config.adapter_layers, n))


def base_config(base: Config | LLaMA | AdaptedLLaMA | str | Path) -> Config:
    """The base model's Config from a Config, a (wrapped) model or a checkpoint spec. HF and Meta
    directories are read from their JSON (and, for Meta, one memory-mapped shard's shapes) without
    loading weights; other formats are loaded with `checkpoint.load_model`."""
    if isinstance(base, Config):
        return base
    if isinstance(base, AdaptedLLaMA):
        return base.model.config
    if isinstance(base, LLaMA):
        return base.config
    source = checkpoint.resolve(base)
    if source.format == "hf":
        return checkpoint.hf_config(source.path, source.name)
    if source.format == "meta":
        return checkpoint.meta_config(source.path, source.name)
    return checkpoint.load_model(base, progress=False).config


def base_summary(c: Config) -> dict[str, Any]:
    return {
        "name": c.name,
        "fingerprint": c.fingerprint(),
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
    }


def detect_format(path: str | Path) -> str:
    """'llama-adapter' (ours), 'peft' or 'official' for an adapter file or directory."""
    p = Path(path)
    if p.is_file():
        if p.suffix in (".pth", ".pt", ".bin"):
            return OFFICIAL
        if p.name in (ADAPTER_CONFIG, PEFT_CONFIG):
            return detect_format(p.parent)
        raise ValueError(f"{p}: not an adapter file; expected an official .pth or an adapter directory")
    if not p.is_dir():
        raise ValueError(f"{p}: no such file or directory")
    cfg = p / ADAPTER_CONFIG
    if not cfg.is_file():
        raise ValueError(
            f"{p}: not an adapter directory ({ADAPTER_CONFIG} missing); expected ours "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), PEFT ({PEFT_CONFIG} + {PEFT_WEIGHTS}) or an official .pth file"
        )
    meta = checkpoint.read_json(cfg)
    if meta.get("format") == OURS:
        return OURS
    if "peft_type" in meta:
        return PEFT
    raise ValueError(f"{cfg}: neither a llama-adapter config (format='llama-adapter') nor a PEFT config (peft_type)")


def require_v1_text(cfg: AdapterConfig, target: str) -> None:
    extra = [f for f in ("visual_dim", "bias_scale", "train_norms", "bind_dim") if getattr(cfg, f, 0)]
    if extra:
        raise ValueError(
            f"{target} holds only text prompts and gates, but this adapter also uses {', '.join(extra)} "
            "(multimodal projection / LLaMA-Adapter V2 / bind network); these cannot be converted"
        )
