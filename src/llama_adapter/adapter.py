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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig, Config
from .model import Attention, LLaMA, Positions, sdpa
from .v2 import BindNetwork, VisualQuery, apply_v2, remove_v2

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


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
    # [B, K] True = a real prompt slot; set when rows with different K share a batch (stack_prompts)
    mask: torch.Tensor | None = None


@dataclass
class PromptState:
    """What every adapted layer gets for one forward / one generate call."""

    layers: dict[int, LayerPrompt] = field(default_factory=dict)
    bind: torch.Tensor | None = None  # [B or 1, dim] ImageBind-style token (gated per layer by the blocks)

    def get(self, layer_idx: int) -> LayerPrompt | None:
        return self.layers.get(layer_idx)

    def row(self, b: int) -> PromptState:
        """Row b of a batched (precomputed) state as a state of its own; [1, ...] tensors broadcast."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[b : b + 1]

        layers = {
            i: LayerPrompt(pick(lp.prompt), pick(lp.gate), None if lp.kv is None else (pick(lp.kv[0]), pick(lp.kv[1])),
                           pick(lp.mask))
            for i, lp in self.layers.items()
        }  # fmt: skip
        return PromptState(layers, pick(self.bind))


def stack_prompts(states: list[PromptState | None]) -> PromptState | None:
    """One state for a batch whose row b uses `states[b]` (precomputed, one row each): the single
    mechanism for mixing adapters, images and plain rows in one forward. A row without a state, or
    whose adapter does not reach a layer, gets gate 0 there: its prompt branch adds exactly nothing.
    Rows with different prompt lengths K are padded and masked, so any adapters can share a step."""
    real = [s for s in states if s is not None]
    if not real:
        return None
    if all(s is real[0] for s in states):
        return real[0]  # one adapter for the whole batch: broadcast, nothing to gather
    out = PromptState()
    for i in sorted({i for s in real for i in s.layers}):
        lps = [None if s is None else s.layers.get(i) for s in states]
        ref = next(lp for lp in lps if lp is not None)
        if any(lp is not None and lp.kv is None for lp in lps):
            raise ValueError("stack_prompts needs precomputed prompt K/V (prompt_state(precompute=True))")
        k_max = max(lp.kv[0].shape[2] for lp in lps if lp is not None)
        ks, vs, gs, ms = [], [], [], []
        for lp in lps:
            k, v = ref.kv if lp is None else lp.kv
            pad = k_max - k.shape[2]
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
            gs.append(torch.zeros_like(ref.gate) if lp is None else lp.gate)
            m = torch.ones(1, k_max, dtype=torch.bool, device=k.device)
            m[:, k.shape[2] :] = False
            ms.append(m if lp is None or lp.mask is None else m & torch.nn.functional.pad(lp.mask, (0, pad)))
        mask = torch.cat(ms)
        out.layers[i] = LayerPrompt(ref.prompt.new_zeros(0), torch.cat(gs), (torch.cat(ks), torch.cat(vs)),
                                    None if bool(mask.all()) else mask)  # fmt: skip
    binds = [None if s is None else s.bind for s in states]
    ref_b = next((b for b in binds if b is not None), None)
    if ref_b is not None:
        out.bind = torch.cat([torch.zeros_like(ref_b) if b is None else b for b in binds])
    return out


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

    def prompt_kv(self, prompt: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts through this layer's frozen K/V projections: no RoPE, no norm (as official).
        `dtype`: the activations' (the projections may hold packed integer weights)."""
        B, K, _ = prompt.shape
        w = self.wo.weight
        prompt = prompt.to(dtype or (w.dtype if w.is_floating_point() else torch.float32))
        _, k, v = self.project(prompt)  # q of K prompt vectors is waste, but only when wq/wk/wv are fused
        k = k.view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, K, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: Positions, ctx: Any) -> torch.Tensor:
        y = super().attend(q, k, v, at, ctx)
        lp = ctx.get(self.layer_idx) if isinstance(ctx, PromptState) else None
        if lp is None:
            return y
        pk, pv = lp.kv if lp.kv is not None else self.prompt_kv(lp.prompt)
        gate = lp.gate.to(y.dtype)
        B, n, K = q.shape[0], pk.shape[0], pk.shape[2]
        # Every token sees every prompt: no causal mask, and a softmax separate from the sequence's.
        pmask = None if lp.mask is None else lp.mask[:, None, None, :]
        if at.packing is not None and n > 1:
            # Packed rows with per-example prompts (images): each token attends to its own example's
            # K prompts among all examples' (one masked softmax, no loop), and takes its gate.
            ex = at.example_of_token  # [B, T]
            own = ex[:, :, None] == torch.arange(n, device=ex.device).repeat_interleave(K)[None, None]
            if lp.mask is not None:
                own = own & lp.mask.reshape(-1)[None, None]
            flat_k = pk.transpose(0, 1).reshape(1, pk.shape[1], n * K, -1).expand(B, -1, -1, -1)
            flat_v = pv.transpose(0, 1).reshape(1, pv.shape[1], n * K, -1).expand(B, -1, -1, -1)
            yp = sdpa(q, flat_k, flat_v, own[:, None], causal=False)
            return y + gate.expand(n, -1)[ex].permute(0, 2, 1)[..., None] * yp
        yp = sdpa(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), pmask, causal=False)
        return y + gate.expand(B, -1)[:, :, None, None] * yp


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
        device = model.device
        self.adapter = AdaptionPrompt(config, model.config).to(device)
        if config.visual_query_blocks and (config.visual_query_dim or model.config.dim) % config.visual_query_heads:
            raise ValueError(
                f"the visual-query width {config.visual_query_dim or model.config.dim} is not divisible by "
                f"visual_query_heads={config.visual_query_heads}; set visual_query_dim or visual_query_heads"
            )
        c = model.config
        # One attribute for either visual module, so callers can test `adapter_visual is not None`.
        self.adapter_visual: nn.Module | None = None
        if config.visual_query_blocks:
            self.adapter_visual = VisualQuery(
                config.visual_tokens, config.visual_token_dim, config.adapter_len, c.dim,
                config.visual_query_dim, config.visual_query_blocks, config.visual_query_heads,
            ).to(device)  # fmt: skip
        elif config.visual_dim:
            self.adapter_visual = VisualProjection(config.visual_dim, c.dim, config.visual_hidden).to(device)
        self.adapted_layers = list(range(c.n_layers - config.adapter_layers, c.n_layers))

        apply_v2(model, bias_scale=config.bias_scale, train_norms=config.train_norms, bind=bool(config.bind_dim))
        self.adapter_bind: BindNetwork | None = None
        if config.bind_dim:
            self.adapter_bind = BindNetwork(config.bind_dim, c.dim, config.bind_blocks, config.bind_hidden, c.norm_eps)
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
        remove_v2(self.model)
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
