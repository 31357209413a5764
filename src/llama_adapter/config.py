"""Model configuration: one dataclass with named presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Config:
    """Shape and numerics of a LLaMA-style decoder."""

    name: str = "custom"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU intermediate size
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama-3.1 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None means plain RoPE.
    rope_scaling: dict[str, float] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim_override: int | None = None  # for models whose head_dim != dim / n_heads
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. chat template)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0:
            raise ValueError(f"config {self.name!r}: dim, n_layers and n_heads must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"config {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}; fix the checkpoint's config"
            )
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(f"config {self.name!r}: dim={self.dim} not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def fingerprint(self) -> str:
        """Hash of everything that decides weight shapes and numerics (not the name)."""
        d = self.to_dict()
        for k in ("name", "extra", "max_seq_len"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, norm_eps=1e-6),
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, norm_eps=1e-5, max_seq_len=4096
    ),
    "llama2-13b": dict(
        dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, norm_eps=1e-5, max_seq_len=4096
    ),
    "llama3-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        vocab_size=128256,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "llama3.1-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        vocab_size=128256,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=131072,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "smollm2-135m": dict(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        vocab_size=49152,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
    "stories260k": dict(
        dim=64,
        n_layers=5,
        n_heads=8,
        n_kv_heads=4,
        hidden_dim=172,
        vocab_size=512,
        norm_eps=1e-5,
        max_seq_len=512,
        tie_embeddings=True,
    ),
}
