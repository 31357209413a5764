"""Configuration dataclasses: the base model (`Config`, with named presets) and the adapter
(`AdapterConfig`), plus the parameter counts an adapter config implies."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
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
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
        bad = [
            f"{k}={getattr(self, k)}" for k in sizes if not (isinstance(getattr(self, k), int) and getattr(self, k) > 0)
        ]
        if bad:
            raise ValueError(
                f"config {self.name!r}: {', '.join(bad)} must be positive integers; fix the checkpoint's config"
            )
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


@dataclass
class AdapterConfig:
    adapter_len: int = 10  # K: prompt vectors per adapted layer (paper: 10)
    adapter_layers: int = 30  # L: how many of the top layers are adapted (paper: 30 of 32)
    # The official code keeps prompts in an nn.Embedding, whose default init is N(0, 1).
    init_std: float = 1.0
    # The gate's starting value: 0 is the paper's zero-init attention; others exist for ablations.
    gate_init: float = 0.0
    # "tanh" as in the paper and the official training code; "identity" reproduces the official
    # inference code and PEFT, which apply the raw gate.
    gate_activation: str = "tanh"
    # Multimodal (paper section 3.3): size of the frozen encoder's concatenated multi-scale global
    # features; 0 = text-only. One projection shared by all adapted layers (the paper adds the same
    # projected visual feature to every layer's prompts).
    visual_dim: int = 0
    visual_hidden: int = 0  # hidden width of the projection MLP; 0 = the model width
    image_encoder: str | None = None  # recorded so inference builds the same frozen encoder
    # LLaMA-Adapter V2 / ImageBind-LLM options (modules in v2.py).
    bias_scale: bool = False  # y = scale * (W x + b) on every block linear, bias 0 / scale 1 at init
    train_norms: bool = False  # RMSNorm weights trainable (as copies named adapter_weight)
    # Early fusion: the visual feature goes only into the first `visual_layers` adapted layers'
    # prompts; later layers keep text-only prompts. 0 = every adapted layer (V1).
    visual_layers: int = 0
    # ImageBind-LLM bind network: modality embedding size (0 = off), residual blocks, hidden width
    # (0 = 4 * dim); its token is added to every layer through zero-init gates.
    bind_dim: int = 0
    bind_blocks: int = 3
    bind_hidden: int = 0
    # V2 visual-query blocks (v2.VisualQuery) instead of the global-feature VisualProjection:
    # `adapter_len` learnable queries attend to the encoder's patch tokens through this many small
    # transformer blocks (0 = off). The adapter then takes `visual_tokens` x `visual_token_dim`
    # tokens per image, passed flattened, so `visual_dim` = visual_tokens * visual_token_dim and
    # every [B, visual_dim] feature path (cache, collate, generate, serve) carries them unchanged.
    visual_query_blocks: int = 0
    visual_query_dim: int = 0  # block width; 0 = the model width
    visual_query_heads: int = 4
    visual_tokens: int = 0  # N tokens per image from the encoder (e.g. 49 for a 7x7 feature map)
    visual_token_dim: int = 0  # d, the width of one encoder token

    def validate(self, base: Config) -> None:
        if self.adapter_len < 1:
            raise ValueError(f"adapter_len={self.adapter_len}: need at least one prompt vector; use --adapter-len 10")
        if not 1 <= self.adapter_layers <= base.n_layers:
            raise ValueError(
                f"adapter_layers={self.adapter_layers}, but the model has {base.n_layers} layers; "
                f"choose 1..{base.n_layers}"
            )
        if self.gate_activation not in ("tanh", "identity"):
            raise ValueError(f"gate_activation={self.gate_activation!r}: choose 'tanh' or 'identity'")
        if self.visual_dim < 0:
            raise ValueError(f"visual_dim={self.visual_dim} must be >= 0")
        if self.visual_layers:
            if self.visual_dim == 0:
                raise ValueError(
                    f"visual_layers={self.visual_layers} (early fusion) needs image features, but "
                    "visual_dim=0 (no image encoder); drop visual_layers or set an image encoder"
                )
            if not 0 < self.visual_layers <= self.adapter_layers:
                raise ValueError(
                    f"visual_layers={self.visual_layers} must be in 1..adapter_layers={self.adapter_layers}; "
                    "drop visual_layers or lower it"
                )
        self._validate_visual_query()
        if self.bind_dim < 0 or self.bind_blocks < 0 or self.bind_hidden < 0:
            raise ValueError("bind_dim, bind_blocks and bind_hidden must be >= 0")
        if self.bind_dim == 0 and (self.bind_blocks != 3 or self.bind_hidden):
            raise ValueError("bind_blocks/bind_hidden are set but bind_dim=0 (no bind network); drop them")

    def _validate_visual_query(self) -> None:
        q = self.visual_query_blocks
        if q < 0 or self.visual_query_dim < 0 or self.visual_tokens < 0 or self.visual_token_dim < 0:
            raise ValueError("visual_query_blocks, visual_query_dim, visual_tokens and visual_token_dim must be >= 0")
        if not q:
            extra = [f for f in ("visual_query_dim", "visual_tokens", "visual_token_dim") if getattr(self, f)]
            if self.visual_query_heads != 4:
                extra.append("visual_query_heads")
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} set but visual_query_blocks=0 (no visual-query blocks); "
                    "drop them or set visual_query_blocks"
                )
            return
        if self.visual_dim == 0:
            raise ValueError(
                f"visual_query_blocks={q} needs an image encoder's patch tokens, but visual_dim=0 (no image "
                "encoder); drop visual_query_blocks or set an image encoder"
            )
        if self.visual_tokens * self.visual_token_dim != self.visual_dim:
            raise ValueError(
                f"visual_query_blocks={q} takes visual_tokens x visual_token_dim = {self.visual_tokens} x "
                f"{self.visual_token_dim} flattened features, but visual_dim={self.visual_dim}; take all three "
                "from the encoder (multimodal.visual_config)"
            )
        if self.visual_hidden:
            raise ValueError(
                "visual_hidden sizes the global-feature projection, which visual_query_blocks replaces; "
                "drop visual_hidden (use visual_query_dim)"
            )
        if self.visual_query_heads < 1 or self.visual_query_dim % self.visual_query_heads:
            raise ValueError(
                f"visual_query_dim={self.visual_query_dim} must be divisible by visual_query_heads="
                f"{self.visual_query_heads} (0 = the model width, checked when the adapter is built)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown adapter config keys {sorted(unknown)}; this version knows {sorted(known)}")
        return cls(**d)


def v2_trainable_count(base: Config, config: AdapterConfig) -> int:
    """Trainable parameters added by the V2 / bind options (on top of the V1 prompts, gates and
    the global-feature visual projection):

    bias_scale:  2 * n_layers * (n_heads*hd + 2*n_kv_heads*hd + 2*dim + 2*hidden_dim)
    train_norms: (2 * n_layers + 1) * dim
    bind:        E*dim + dim + N*(dim + 3*dim*bind_hidden) + n_layers   (gates)
    visual query (replaces the visual projection): see `visual_query_count`
    """
    c, hd = base, base.head_dim
    n = 0
    if config.bias_scale:
        n += 2 * c.n_layers * (c.n_heads * hd + 2 * c.n_kv_heads * hd + 2 * c.dim + 2 * c.hidden_dim)
    if config.train_norms:
        n += (2 * c.n_layers + 1) * c.dim
    if config.bind_dim:
        h = config.bind_hidden or 4 * c.dim
        n += config.bind_dim * c.dim + c.dim + config.bind_blocks * (c.dim + 3 * c.dim * h) + c.n_layers
    if config.visual_query_blocks:
        n += visual_query_count(base, config)
    return n


def visual_query_count(base: Config, config: AdapterConfig) -> int:
    """Parameters of `VisualQuery` with N encoder tokens of width d, K queries, width w, B blocks:

    d*w + w + 2w (token projection + norm)  +  N*w (token positions)  +  K*w (queries)
    + B * (12 w^2 + 13 w)  (per block: 2 LayerNorms 4w, qkv 3w^2+3w, out w^2+w, MLP 8w^2+5w)
    + w*dim + dim + 2*dim  (output projection + LayerNorm)
    """
    w = config.visual_query_dim or base.dim
    d, N, K = config.visual_token_dim, config.visual_tokens, config.adapter_len
    blocks = config.visual_query_blocks * (12 * w * w + 13 * w)
    return d * w + 3 * w + N * w + K * w + blocks + w * base.dim + 3 * base.dim


LLAMA3_8B: dict[str, Any] = dict(
    dim=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    hidden_dim=14336,
    vocab_size=128256,
    norm_eps=1e-5,
    rope_theta=500000.0,
    max_seq_len=8192,
)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, norm_eps=1e-6),
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, norm_eps=1e-5, max_seq_len=4096
    ),
    "llama2-13b": dict(
        dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, norm_eps=1e-5, max_seq_len=4096
    ),
    "llama3-8b": LLAMA3_8B,
    "llama3.1-8b": dict(
        LLAMA3_8B,
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
