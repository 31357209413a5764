"""LLaMA-Adapter: zero-init gated adaption prompts (arXiv 2303.16199).

The top `adapter_layers` layers of a frozen LLaMA get `adapter_len` learnable prompt vectors each.
In those layers the prompts pass through the layer's own frozen key/value projections (no RoPE,
visible to every token) and get a softmax of their own, scaled per head by `tanh(gate)` with the
gate initialised to 0, so at step 0 the adapted model computes exactly what the frozen one does:

    out = sdpa(q, k_seq, v_seq, causal) + tanh(gate)[h] * sdpa(q, k_prompt, v_prompt)

Prompts reach the attention through a `PromptState` built once per forward (training) or once per
`generate` call (inference, with prompt K/V precomputed): per-row tensors `[B or 1, K, dim]`, so
multimodal prompts, several adapters per batch and early fusion only change what each layer gets.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config
from .model import Attention, LLaMA, sdpa

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


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
    # LLaMA-Adapter V2 / ImageBind-LLM options (implemented in v2.py).
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


def is_adapter_param(name: str) -> bool:
    """THE predicate: trainable == saved == everything under a name part starting with 'adapter'."""
    return any(part.startswith("adapter") for part in name.split("."))


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gates, norms, biases and scales are not decayed (as in the official code)."""
    return param.ndim < 2 or "gate" in name or name.endswith(("bias", "scale"))


@dataclass
class LayerPrompt:
    prompt: torch.Tensor  # [B or 1, K, dim]
    gate: torch.Tensor  # [B or 1, n_heads], activation already applied
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # precomputed [B or 1, n_kv_heads, K, head_dim]


@dataclass
class PromptState:
    """What every adapted layer gets for one forward / one generate call."""

    layers: dict[int, LayerPrompt] = field(default_factory=dict)
    bind: torch.Tensor | None = None  # [B or 1, dim] ImageBind-style token (gated per layer by the blocks)

    def get(self, layer_idx: int) -> LayerPrompt | None:
        return self.layers.get(layer_idx)


class AdaptedAttention(Attention):
    """Base attention plus the gated prompt branch; shares the base's frozen projections."""

    layer_idx: int

    @classmethod
    def wrap(cls, base: Attention, layer_idx: int) -> AdaptedAttention:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in base.named_children():
            setattr(new, name, child)
        new.n_heads, new.n_kv_heads, new.head_dim = base.n_heads, base.n_kv_heads, base.head_dim
        new.layer_idx = layer_idx
        return new

    def unwrap(self) -> Attention:
        base = Attention.__new__(Attention)
        nn.Module.__init__(base)
        for name, child in self.named_children():
            setattr(base, name, child)
        base.n_heads, base.n_kv_heads, base.head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        return base

    def prompt_kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts through this layer's frozen K/V projections: no RoPE, no norm (as official)."""
        B, K, _ = prompt.shape
        prompt = prompt.to(self.wk.weight.dtype)
        k = self.wk(prompt).view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(prompt).view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, ctx: Any
    ) -> torch.Tensor:
        y = sdpa(q, k, v, mask)
        lp = ctx.get(self.layer_idx) if isinstance(ctx, PromptState) else None
        if lp is None:
            return y
        pk, pv = lp.kv if lp.kv is not None else self.prompt_kv(lp.prompt)
        B = q.shape[0]
        # Every token sees every prompt: no mask, and a softmax separate from the sequence's.
        yp = sdpa(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), None, causal=False)
        return y + lp.gate.to(y.dtype).expand(B, -1)[:, :, None, None] * yp


class AdaptionPrompt(nn.Module):
    """The trainable part: L*K prompt vectors (one [L*K, dim] tensor, as the official file) and
    L x n_heads gates."""

    def __init__(self, config: AdapterConfig, base: Config) -> None:
        super().__init__()
        self.config = config
        self.prompts = nn.Parameter(torch.empty(config.adapter_layers * config.adapter_len, base.dim))
        self.gates = nn.Parameter(torch.empty(config.adapter_layers, base.n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The single place where zero-init happens."""
        if self.prompts.is_meta:
            return
        nn.init.normal_(self.prompts, std=self.config.init_std)
        nn.init.constant_(self.gates, self.config.gate_init)

    def layer_prompts(self) -> torch.Tensor:
        c = self.config
        return self.prompts.view(c.adapter_layers, c.adapter_len, -1)

    def activated_gates(self) -> torch.Tensor:
        return torch.tanh(self.gates) if self.config.gate_activation == "tanh" else self.gates


class VisualProjection(nn.Module):
    """Concatenated multi-scale image features [B, visual_dim] -> [B, dim] (learnable)."""

    def __init__(self, visual_dim: int, dim: int, hidden: int = 0) -> None:
        super().__init__()
        hidden = hidden or dim
        self.norm = nn.LayerNorm(visual_dim)
        self.fc1 = nn.Linear(visual_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(feats))))


class AdaptedLLaMA(nn.Module):
    """A frozen LLaMA whose top layers attend to adaption prompts.

    The base model's top-layer attentions are replaced in place by `AdaptedAttention` modules that
    share its weights; `detach_base()` undoes that.
    """

    def __init__(self, model: LLaMA, config: AdapterConfig) -> None:
        super().__init__()
        config.validate(model.config)
        self.model = model
        self.adapter_config = config
        device = model.tok_embeddings.weight.device
        self.adapter = AdaptionPrompt(config, model.config).to(device)
        from . import v2  # V2 bias/scale, trainable norms, visual query and bind injection live in v2.py

        if config.visual_query_blocks and (config.visual_query_dim or model.config.dim) % config.visual_query_heads:
            raise ValueError(
                f"the visual-query width {config.visual_query_dim or model.config.dim} is not divisible by "
                f"visual_query_heads={config.visual_query_heads}; set visual_query_dim or visual_query_heads"
            )
        # One attribute for either visual module, so callers can test `adapter_visual is not None`.
        self.adapter_visual: nn.Module | None = None
        if config.visual_query_blocks:
            self.adapter_visual = v2.make_visual_query(config, model.config).to(device)
        elif config.visual_dim:
            self.adapter_visual = VisualProjection(config.visual_dim, model.config.dim, config.visual_hidden).to(device)
        n = model.config.n_layers
        self.adapted_layers = list(range(n - config.adapter_layers, n))

        v2.apply_v2(model, config)
        self.adapter_bind = v2.make_bind(config, model.config)
        if self.adapter_bind is not None:
            self.adapter_bind.to(device)
        for i in self.adapted_layers:
            attn = model.layers[i].attention
            if not isinstance(attn, AdaptedAttention):
                model.layers[i].attention = AdaptedAttention.wrap(attn, i)
        mark_trainable(self)

    @property
    def config(self) -> Config:
        return self.model.config

    def new_cache(self, *args: Any, **kwargs: Any) -> list:
        return self.model.new_cache(*args, **kwargs)

    def visual_prompt(self, visual: torch.Tensor, has_image: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features [B, visual_dim] -> what to add to the prompts: [B, dim] (global-feature
        projection, same vector at every prompt position) or [B, K, dim] (visual-query blocks; they
        also take tokens unflattened, [B, N, d]). Rows whose `has_image` is False add exactly
        nothing."""
        cfg = self.adapter_config
        if self.adapter_visual is None:
            raise ValueError(
                "this adapter is text-only (trained without --image-encoder); drop the image "
                "or use an adapter trained with images"
            )
        if cfg.visual_query_blocks and visual.ndim == 3:
            visual = visual.flatten(1)
        if visual.shape[-1] != cfg.visual_dim:
            raise ValueError(
                f"image features have size {visual.shape[-1]}, the adapter expects "
                f"{cfg.visual_dim} (encoder {cfg.image_encoder!r})"
            )
        dtype = next(self.adapter_visual.parameters()).dtype
        if cfg.visual_query_blocks:
            visual = visual.view(visual.shape[0], cfg.visual_tokens, cfg.visual_token_dim)
        p = self.adapter_visual(visual.to(dtype))
        if has_image is not None:
            mask = has_image.to(p.dtype)
            # A product, not a branch: the module stays in the graph for text rows (DDP sees every
            # parameter used), and 0 * finite is exactly 0.
            p = p * mask.view(-1, *([1] * (p.ndim - 1)))
        return p

    def prompt_state(
        self,
        add: torch.Tensor | None = None,
        precompute: bool = False,
        *,
        visual: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        bind: torch.Tensor | None = None,
    ) -> PromptState:
        """Per-layer prompts for one call. `visual` [B, visual_dim] encoder features (projected and
        added to every adapted layer's prompts) or `add` [B, dim] / [B, K, dim] already in model
        width;
        `precompute` projects prompt K/V once (inference only). With `visual_layers` (early fusion)
        `add` / `visual` reach only the first `visual_layers` adapted layers. `bind` [B, bind_dim]
        is a modality embedding for the bind network (rows masked by `has_image`)."""
        if visual is not None:
            v = self.visual_prompt(visual, has_image)
            add = v if add is None else add + v
        prompts = self.adapter.layer_prompts()
        gates = self.adapter.activated_gates()
        state = PromptState()
        fused = self.adapter_config.visual_layers or len(self.adapted_layers)
        for j, i in enumerate(self.adapted_layers):
            p = prompts[j][None]
            if add is not None and j < fused:
                p = p + (add[:, None, :] if add.ndim == 2 else add).to(p.dtype)
            lp = LayerPrompt(p, gates[j][None])
            if precompute:
                lp.kv = self.model.layers[i].attention.prompt_kv(p)
            state.layers[i] = lp
        if bind is not None:
            if self.adapter_bind is None:
                raise ValueError("this adapter has no bind network (bind_dim=0); drop the modality embedding")
            b = self.adapter_bind(bind.to(self.adapter_bind.proj.weight.dtype))
            state.bind = b if has_image is None else b * has_image.to(b.dtype)[:, None]
        return state

    def forward(self, idx: torch.Tensor, *, ctx: Any = None, **kwargs: Any) -> torch.Tensor:
        if ctx is None:
            # Rebuilt every call: nothing derived from trainable parameters outlives a step.
            ctx = self.prompt_state()
        kwargs.setdefault("grad_from", min(self.adapted_layers[0], self.model.first_trainable_layer()))
        return self.model(idx, ctx=ctx, **kwargs)

    def detach_base(self) -> LLaMA:
        for i in self.adapted_layers:
            attn = self.model.layers[i].attention
            if isinstance(attn, AdaptedAttention):
                self.model.layers[i].attention = attn.unwrap()
        from . import v2

        v2.remove_v2(self.model)
        return self.model


def adapter_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in module.named_parameters():
        if is_adapter_param(name):
            yield name, p


def mark_trainable(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter_param(name))


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in adapter_named_parameters(module)}


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in adapter_named_parameters(module):
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: a crash never leaves a
    half-written file behind under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(
    model: AdaptedLLaMA,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """`adapter.safetensors` + `adapter_config.json` (what base it needs, K, L, dtype, run info)."""
    out = Path(out_dir)
    tensors = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    base = model.config
    meta = {
        "format": "llama-adapter",
        "format_version": FORMAT_VERSION,
        "adapter": model.adapter_config.to_dict(),
        "base": {"name": base.name, "fingerprint": base.fingerprint(), "config": base.to_dict()},
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        **(metadata or {}),
    }
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    d = Path(adapter_dir)
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(
            f"{d} is not an adapter directory: {ADAPTER_CONFIG} is missing "
            f"(point --adapter at the --out directory of `llama-adapter finetune`)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged") from e
    if meta.get("format") != "llama-adapter":
        raise ValueError(
            f"{path} is not a llama-adapter config (format={meta.get('format')!r}); "
            "for PEFT or official adapters use `llama-adapter convert`"
        )
    return meta


def check_compatible(meta: dict[str, Any], base: Config, where: str = "adapter") -> None:
    want = Config.from_dict(meta["base"]["config"])
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        a, b = getattr(want, key), getattr(base, key)
        if a != b:
            raise ValueError(
                f"{where} was trained for base '{want.name}' with {key}={a}, but the loaded model "
                f"'{base.name}' has {key}={b}; load the base model it was trained on"
            )


def load_adapter(model: LLaMA | AdaptedLLaMA, adapter_dir: str | Path) -> AdaptedLLaMA:
    """Wrap `model` (or re-use an existing wrapper) and load weights saved by `save_adapter`."""
    meta = read_adapter_config(adapter_dir)
    base = model.model if isinstance(model, AdaptedLLaMA) else model
    check_compatible(meta, base.config, where=str(adapter_dir))
    wrapped = AdaptedLLaMA(base, AdapterConfig.from_dict(meta["adapter"]))
    load_adapter_weights(wrapped, Path(adapter_dir) / ADAPTER_WEIGHTS)
    return wrapped


def load_adapter_weights(model: AdaptedLLaMA, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapter weights {path} not found")
    sd = load_file(path)
    expected = dict(adapter_named_parameters(model))
    for name, p in expected.items():
        if name not in sd:
            raise ValueError(f"{path}: missing tensor {name!r}; the file has {sorted(sd)}")
        if tuple(sd[name].shape) != tuple(p.shape):
            raise ValueError(
                f"{path}: {name} has shape {list(sd[name].shape)}, the model expects "
                f"{list(p.shape)}; the adapter was saved for a different config"
            )
    extra = set(sd) - set(expected)
    if extra:
        raise ValueError(f"{path}: unexpected tensors {sorted(extra)}; was it saved by another version?")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(sd[name].to(p.dtype))


# ------------------------------------------------------------------------------------ several adapters
class AdapterBank(nn.Module):
    """Several V1 prompt adapters over ONE frozen base; each row of a batch picks its own.

    The base's top attentions are wrapped once (in place, sharing the base weights, exactly as
    `AdaptedLLaMA` does); the bank itself holds only the adapters' small tensors, stacked:
    `prompts` [N + 1, L, K, dim] and activated gates `gates` [N + 1, L, n_heads] (the last entry is
    "no adapter": zero prompts, zero gates). Switching adapters is a gather, never a reload.

        bank = AdapterBank(base)
        bank.add("alpaca", "runs/alpaca"); bank.add("code", "runs/code")
        rows = bank.rows(["alpaca", None, "code"])         # LongTensor [B]; -1 = frozen base
        logits = bank(idx, rows=rows)                       # or: generate(base, prompts, params,
                                                            #        ctx=bank.prompt_state(rows))

    Shapes across adapters: every adapter must have the same `adapter_len` K (prompt blocks of
    different lengths cannot share one softmax without a mask; a clear error says so). Different
    `adapter_layers` are padded, exactly: the bank adapts the top max(L) layers and an adapter with
    fewer layers gets gate 0 (and zero prompts) in the layers below its own, which adds nothing.
    Gates are stored activated (`tanh(g)` or `g`), so adapters with different `gate_activation`
    mix freely. Only text V1 adapters fit: V2 bias/scale, trainable norms and bind networks live in
    the base modules (one per base, see v2.py) and visual adapters need their projection; use
    `AdaptedLLaMA` for those.
    """

    def __init__(self, model: LLaMA) -> None:
        super().__init__()
        if isinstance(model, AdaptedLLaMA):
            model = model.model
        self.model = model
        self._names: list[str] = []
        self.adapter_len: int | None = None
        self.adapted_layers: list[int] = []
        c = model.config
        self.register_buffer("prompts", torch.zeros(1, 0, 0, c.dim), persistent=False)
        self.register_buffer("gates", torch.zeros(1, 0, c.n_heads), persistent=False)

    @property
    def config(self) -> Config:
        return self.model.config

    def names(self) -> list[str]:
        return list(self._names)

    def index(self, name: str | None) -> int:
        if name is None:
            return -1
        if name not in self._names:
            raise ValueError(f"unknown adapter {name!r}; loaded: {', '.join(self._names) or '(none)'}")
        return self._names.index(name)

    def rows(self, names: list[str | None]) -> torch.Tensor:
        """Adapter names per row (None = frozen base) -> the LongTensor [B] `prompt_state` takes."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.long, device=self.prompts.device)

    def add(self, name: str, adapter: str | Path | AdaptedLLaMA) -> None:
        """Load an adapter directory (`save_adapter` format) or take an `AdaptedLLaMA`'s tensors
        (it must wrap this bank's base). Converted PEFT / official adapters: see interop.py."""
        if name in self._names:
            raise ValueError(f"adapter name {name!r} is already loaded; pick another name")
        if isinstance(adapter, AdaptedLLaMA):
            if adapter.model is not self.model:
                raise ValueError(f"adapter {name!r} wraps a different base model object; load it onto the bank's base")
            cfg = adapter.adapter_config
            prompts, raw_gates = adapter.adapter.prompts.detach(), adapter.adapter.gates.detach()
        else:
            meta = read_adapter_config(adapter)
            check_compatible(meta, self.config, where=str(adapter))
            cfg = AdapterConfig.from_dict(meta["adapter"])
            cfg.validate(self.config)
            path = Path(adapter) / ADAPTER_WEIGHTS
            if not path.is_file():
                raise ValueError(f"adapter weights {path} not found")
            sd = load_file(path)
            want = {
                "adapter.prompts": (cfg.adapter_layers * cfg.adapter_len, self.config.dim),
                "adapter.gates": (cfg.adapter_layers, self.config.n_heads),
            }
            self._check_v1(name, cfg, extra=sorted(set(sd) - set(want)))
            for key, shape in want.items():
                if key not in sd or tuple(sd[key].shape) != shape:
                    got = list(sd[key].shape) if key in sd else "missing"
                    raise ValueError(f"{path}: {key} is {got}, expected {list(shape)} for K={cfg.adapter_len}, "
                                     f"L={cfg.adapter_layers} on this base")  # fmt: skip
            prompts, raw_gates = sd["adapter.prompts"], sd["adapter.gates"]
        self._check_v1(name, cfg)
        if self.adapter_len is not None and cfg.adapter_len != self.adapter_len:
            raise ValueError(
                f"adapter {name!r} has adapter_len={cfg.adapter_len}, the bank's adapters have "
                f"{self.adapter_len}; adapters in one bank need the same prompt length K (use a second bank)"
            )
        gates = torch.tanh(raw_gates.float()) if cfg.gate_activation == "tanh" else raw_gates.float()
        self._append(name, prompts.float().view(cfg.adapter_layers, cfg.adapter_len, -1), gates)

    def _check_v1(self, name: str, cfg: AdapterConfig, extra: list[str] | None = None) -> None:
        v2 = [f for f in ("bias_scale", "train_norms", "visual_dim", "bind_dim") if getattr(cfg, f, 0)]
        if v2 or extra:
            raise ValueError(
                f"adapter {name!r} is not a text-only V1 prompt adapter ({', '.join(v2) or extra} set); "
                "V2/bind adapters change base modules and visual adapters need their projection, so they "
                "cannot share a base in a bank; load them with load_adapter instead"
            )

    def _append(self, name: str, prompts: torch.Tensor, gates: torch.Tensor) -> None:
        """prompts [L, K, dim], activated gates [L, n_heads]; grow the stack to max(L) layers."""
        L, K, dim = prompts.shape
        n = self.config.n_layers
        new_l = max(L, len(self.adapted_layers))
        old = self.prompts.shape[0] - 1  # adapters already stacked (without the "no adapter" entry)
        old_l = len(self.adapted_layers)
        dev = self.prompts.device
        P = torch.zeros(old + 2, new_l, K, dim, device=dev)
        G = torch.zeros(old + 2, new_l, self.config.n_heads, device=dev)
        if old:  # existing adapters keep their top rows; new lower layers get gate 0
            P[:old, new_l - old_l :] = self.prompts[:old].float()
            G[:old, new_l - old_l :] = self.gates[:old].float()
        P[old, new_l - L :] = prompts.to(dev)
        G[old, new_l - L :] = gates.to(dev)
        self.prompts, self.gates = P.to(self.prompts.dtype), G.to(self.gates.dtype)
        self.adapter_len = K
        self._names.append(name)
        self.adapted_layers = list(range(n - new_l, n))
        for i in self.adapted_layers:  # wrap once; AdaptedAttention shares the base's projections
            attn = self.model.layers[i].attention
            if not isinstance(attn, AdaptedAttention):
                self.model.layers[i].attention = AdaptedAttention.wrap(attn, i)

    def prompt_state(self, rows: torch.Tensor, precompute: bool = True) -> PromptState:
        """Per-row prompts [B, K, dim] and gates [B, n_heads] for every adapted layer; row index -1
        (or an adapter that does not reach a layer) gets gate 0, i.e. the frozen base exactly.
        `precompute` projects prompt K/V once per adapter (not per row) and gathers them."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.prompts.device)
        n = len(self._names)
        if rows.ndim != 1 or bool(((rows < -1) | (rows >= n)).any()):
            raise ValueError(f"rows must be a 1-D tensor of adapter indices in -1..{n - 1}; got {rows.tolist()}")
        idx = torch.where(rows < 0, n, rows)  # -1 -> the "no adapter" entry
        state = PromptState()
        for j, i in enumerate(self.adapted_layers):
            gate = self.gates[idx, j]
            attn = self.model.layers[i].attention
            if precompute:
                k, v = attn.prompt_kv(self.prompts[:, j])  # [N + 1, Hkv, K, hd], once per adapter
                lp = LayerPrompt(self.prompts[idx, j], gate, (k[idx], v[idx]))
            else:
                lp = LayerPrompt(self.prompts[idx, j], gate)
            state.layers[i] = lp
        return state

    def forward(self, idx: torch.Tensor, *, rows: torch.Tensor, ctx: Any = None, **kwargs: Any) -> torch.Tensor:
        if ctx is None:
            ctx = self.prompt_state(rows, precompute=True)
        return self.model(idx, ctx=ctx, **kwargs)
