"""Assemble what a command needs to talk to a model: base weights + tokenizer + adapters + chat
template (+ the encoders of multimodal adapters). `generate`, `chat`, `evaluate`, `serve` and
`finetune` all come through here, so the rules live in one place:

- `resolve_template`: which prompt template a run uses (the one rule, see its docstring);
- `load_stack`: load everything, check adapters against the base, refuse combinations that
  cannot share one base (two adapters that both change base modules, V2/ImageBind);
- `Stack.row_prompt` / `batch_prompt`: the per-row adapter prompt state (with an input of any
  modality the adapter takes: image, audio, video, points) that the decode engine gathers into a
  batch; `Stack.check_input` is the one rule for which model takes which modality.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import AdaptedLLaMA, PromptState, load_adapter, read_adapter_config
from .checkpoint import load_model, resolve
from .model import LLaMA
from .multimodal import Input, ModalitySet, as_input
from .quant import kernels_available, unavailable_reason
from .tokenizer import TEMPLATES, alpaca_prompt, load_tokenizer, render_chat

PURPOSES = ("complete", "instruct", "chat")


def resolve_template(
    requested: str | None, tokenizer: Any, adapter_meta: dict[str, Any] | None = None, purpose: str = "complete"
) -> str:
    """The prompt template of a run, by one rule:

    1. an explicit template (anything but None / "auto") wins;
    2. else the template an adapter was trained with (recorded in its config);
    3. else an adapter that recorded none was trained on Alpaca prompts: "alpaca";
    4. else the tokenizer's own chat template (SmolLM2's GGUF: "chatml");
    5. else by purpose: "complete" (generate, serve, multiple choice) feeds text as is ("plain"),
       "instruct" (finetune, held-out loss) formats instruction data as "alpaca", and "chat"
       needs turns, so "chatml".
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}: choose one of {', '.join(PURPOSES)}")
    if requested not in (None, "", "auto"):
        if requested not in TEMPLATES:
            raise ValueError(f"unknown template {requested!r}; choose auto or one of: {', '.join(TEMPLATES)}")
        return requested
    if adapter_meta is not None:
        return adapter_meta.get("template") or "alpaca"
    chat = getattr(tokenizer, "chat_template", None)
    if chat:
        return chat
    return {"complete": "plain", "instruct": "alpaca", "chat": "chatml"}[purpose]


def render_prompt(prompt: str, template: str) -> str:
    """One user turn as prompt text, ready for generation."""
    if template == "plain":
        return prompt
    if template == "alpaca":
        return alpaca_prompt(prompt)
    return render_chat([{"role": "user", "content": prompt}], template, add_generation_prompt=True)


def encoder_weights(
    adapter_dir: str | os.PathLike[str] | None,
    meta: dict[str, Any] | None,
    override: str | os.PathLike[str] | None = None,
) -> str | None:
    """The image encoder checkpoint to use with an adapter: `override` if given, else the path
    `finetune --image-encoder-weights` recorded in the adapter's metadata (top-level
    `image_encoder_weights`, or the saved train args). None means the encoder's packaged weights
    (EfficientNet-Lite0). A relative recorded path is tried from the current directory, then
    from the adapter directory (runs are often moved together with their checkpoint). Raises
    ValueError naming the file when it is gone."""
    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise ValueError(f"--image-encoder-weights {p} not found; check the path")
        return str(p)
    meta = meta or {}
    recorded = meta.get("image_encoder_weights") or (meta.get("train") or {}).get("image_encoder_weights")
    if not recorded:
        return None
    p = Path(recorded)
    tried = [p]
    if not p.is_absolute() and adapter_dir is not None:
        tried.append(Path(adapter_dir) / p)
    for t in tried:
        if t.is_file():
            return str(t)
    encoder = (meta.get("adapter") or {}).get("image_encoder") or "the image encoder"
    raise ValueError(
        f"the adapter {adapter_dir} was trained with {encoder} weights {recorded}, which are gone "
        f"(tried {', '.join(str(t) for t in tried)}); pass --image-encoder-weights PATH to the same checkpoint"
    )


def input_prompt_state(
    model: Any,
    inputs: Sequence[Any],
    *,
    modalities: ModalitySet | None = None,
    weights: str | os.PathLike[str] | None = None,
    who: str = "this adapter",
) -> PromptState | None:
    """A precomputed `PromptState` [B, ...] for a batch whose rows each have one input of any
    modality (an `Input`; an image path or PIL image also works) or None. Rows without an input add
    nothing to the prompts, so they generate exactly what the text-only adapter generates.
    `modalities` defaults to what the adapter's config implies (images and video). Returns None
    for a plain model with no inputs; ValueError for an input the model cannot take, naming the
    modalities it takes."""
    inputs = [as_input(x) for x in inputs]
    given = next((x for x in inputs if x is not None), None)
    if not isinstance(model, AdaptedLLaMA):
        if given is not None:
            raise ValueError(f"the frozen base model takes text only, not {given.modality}; pick an adapter built "
                             f"for {given.modality} (--adapter DIR)")  # fmt: skip
        return None
    if given is None:
        return model.prompt_state(precompute=True)
    cfg = model.adapter_config
    mods = modalities if modalities is not None else ModalitySet.for_adapter(cfg)
    if mods is None:
        raise ValueError(f"{who} is text-only (trained without --image-encoder); drop the {given.modality} or use "
                         "a multimodal adapter")  # fmt: skip
    for x in inputs:
        mods.check(x, who)
    device = next(model.parameters()).device
    kw = mods.adapter_inputs(inputs, cfg, weights, device=device)
    return model.prompt_state(**{k: v.to(device) for k, v in kw.items()}, precompute=True)


def image_prompt_state(
    model: Any, images: list[Any], *, weights: str | os.PathLike[str] | None = None
) -> PromptState | None:
    """`input_prompt_state` for rows that each have an image (path or PIL image) or None."""
    return input_prompt_state(model, images, weights=weights)


@dataclass
class LoadedAdapter:
    name: str
    model: AdaptedLLaMA
    meta: dict[str, Any]
    template: str
    path: str
    encoder_weights: str | None = None  # resolved lazily: a text-only run never needs the file
    weights_override: str | None = None
    _weights_resolved: bool = False
    _modalities: ModalitySet | None | bool = False  # False: not read yet

    @property
    def modalities(self) -> ModalitySet | None:
        """What the adapter takes besides text (None: text only), read from its directory once."""
        if self._modalities is False:
            mods = ModalitySet.for_adapter(self.model.adapter_config, self.meta, self.path or None)
            if mods is not None:
                mods.to(next(self.model.parameters()).device)
            self._modalities = mods
        return self._modalities

    @property
    def takes(self) -> tuple[str, ...]:
        """The modalities besides text, e.g. ("image", "video"); () for a text-only adapter."""
        return () if self.modalities is None else self.modalities.modalities

    @property
    def multimodal(self) -> bool:
        return self.modalities is not None

    def image_weights(self) -> str | None:
        if not self._weights_resolved:
            self.encoder_weights = encoder_weights(self.path, self.meta, self.weights_override)
            self._weights_resolved = True
        return self.encoder_weights


@dataclass
class Stack:
    """A frozen base with its tokenizer, template and any number of adapters loaded onto it."""

    model: LLaMA
    tokenizer: Any
    template: str  # for the base model itself
    name: str
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)

    def adapter(self, name: str | None) -> LoadedAdapter | None:
        if name is None or name == self.name:
            return None
        if name not in self.adapters:
            raise ValueError(f"unknown model {name!r}; available: {', '.join([self.name, *self.adapters])}")
        return self.adapters[name]

    def only(self) -> AdaptedLLaMA | LLaMA:
        """The model to use when one adapter (or none) was loaded."""
        return next(iter(self.adapters.values())).model if len(self.adapters) == 1 else self.model

    def template_of(self, name: str | None) -> str:
        a = self.adapter(name)
        return self.template if a is None else a.template

    def takes(self, name: str | None) -> tuple[str, ...]:
        """The modalities model `name` takes besides text; () for the base and text-only adapters."""
        a = self.adapter(name)
        return () if a is None else a.takes

    def check_input(self, name: str | None, modality: str | None) -> None:
        """ValueError (naming what the model does take) when model `name` cannot take `modality`."""
        if modality is None or modality in self.takes(name):
            return
        a = self.adapter(name)
        if a is None:
            raise ValueError(f"model {name or self.name!r} is the frozen base model and takes text only, not "
                             f"{modality}; load a multimodal adapter built for it (--adapter DIR)")  # fmt: skip
        if a.modalities is None:
            raise ValueError(f"adapter {a.name!r} is text-only (trained without --image-encoder); it takes no "
                             f"{modality}: drop it or use a multimodal adapter")  # fmt: skip
        a.modalities.check(Input(modality, None), f"adapter {a.name!r}")

    def row_prompt(self, name: str | None, input: Any = None) -> PromptState | None:
        """One row's precomputed prompt state: adapter `name` (None = the frozen base), with an
        `Input` of any modality the adapter takes (an image path or PIL image works too)."""
        return self.batch_prompt(name, [input])

    def batch_prompt(self, name: str | None, inputs: Sequence[Any]) -> PromptState | None:
        """The prompt state [B, ...] of rows of one adapter, each with an `Input` (or image path /
        PIL image) or None; each encoder runs once for the whole batch."""
        inputs = [as_input(x) for x in inputs]
        for x in inputs:
            self.check_input(name, None if x is None else x.modality)
        a = self.adapter(name)
        if a is None:
            return None
        if all(x is None for x in inputs):
            return a.model.prompt_state(precompute=True)
        weights = a.image_weights() if any(x.modality in ("image", "video") for x in inputs if x) else None
        return input_prompt_state(a.model, inputs, modalities=a.modalities, weights=weights,
                                  who=f"adapter {a.name!r}")  # fmt: skip


WEIGHTS = ("auto", "fp32", "bf16", "fp16", "q8", "q4", "q8_0", "q4_0", "q4_1")
_ALIASES = {"q8": "q8_0", "q4": "q4_1"}
WEIGHTS_HELP = (
    "how the frozen weights are held: auto (a GGUF keeps its quantized tensors; float checkpoints become q8_0 "
    "where the CPU kernels run), fp32, bf16, fp16, q8 (q8_0), q4 (q4_1), q4_0 (default: %(default)s)"
)
_FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("llama_adapter")


def resolve_weights(requested: str | None, model: str, purpose: str = "complete") -> str | None:
    """How the frozen base holds its linear weights (`checkpoint.load_model(weights=...)`).

    "auto", the default, picks the fastest format that keeps the model's quality on this machine:
    - a GGUF file keeps its quantized tensors as stored (Q4_0/Q4_1/Q8_0 run directly, K-quants are
      re-packed): nothing is dequantized to fp32;
    - a float checkpoint (HF, Meta, llama2.c) is quantized to q8_0 at load for generation and
      evaluation (8-bit: within 1% of fp32 perplexity, see benchmarks/results.md);
    - training ("instruct") keeps float weights: large-matrix products run as dequantize + fp32 GEMM,
      so packing saves memory, not time;
    - without the AVX2 kernels (no compiler, another CPU) everything stays fp32.
    "q8"/"q4" (q8_0 / q4_1) quantize float checkpoints (a GGUF's own quantized tensors are kept);
    "fp32"/"bf16"/"fp16" dequantize everything to that dtype. Asking for a packed format where the
    kernels cannot run falls back to fp32 with a one-line notice.
    """
    w = _ALIASES.get(requested or "auto", requested or "auto")
    if w not in WEIGHTS:
        raise ValueError(f"--weights {requested!r}: choose one of {', '.join(WEIGHTS)}")
    if w in _FLOAT:
        return w
    if not kernels_available():
        if w != "auto":
            log.warning("note: --weights %s needs the CPU kernels (%s); using fp32 weights", w, unavailable_reason())
        return None
    if w != "auto":
        return w
    if resolve(model).format == "gguf":
        return "keep"
    return None if purpose == "instruct" else "q8_0"


def load_stack(
    model: str,
    adapters: dict[str, str] | str | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    template: str | None = "auto",
    purpose: str = "complete",
    tokenizer: str | None = None,
    image_encoder_weights: str | None = None,
    weights: str | None = "auto",
) -> Stack:
    """Load a base model (a `checkpoint.load_model` spec), its tokenizer (next to the weights, or
    `tokenizer`) and adapters ({name: directory}, or one directory) onto that one base, its linear
    weights held as `resolve_weights` decides."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    w = resolve_weights(weights, model, purpose)
    dtype = _FLOAT.get(w or "", dtype)
    base = load_model(model, dtype=dtype, weights=w)
    if device:
        base = base.to(device)
    tok_path = tokenizer or base.config.extra.get("tokenizer")
    if not tok_path:
        raise ValueError(f"no tokenizer found next to {model}; pass --tokenizer PATH (tokenizer.model/.json/.bin)")
    tok = load_tokenizer(tok_path)
    if isinstance(adapters, (str, os.PathLike)):
        adapters = {Path(adapters).name or "adapter": str(adapters)}
    metas = {name: read_adapter_config(path) for name, path in (adapters or {}).items()}
    _check_shareable(metas)
    explicit = template if template not in (None, "", "auto") else None
    loaded: dict[str, LoadedAdapter] = {}
    for name, path in (adapters or {}).items():
        ad = load_adapter(base, path).to(dtype).eval()
        t = resolve_template(explicit, tok, metas[name], purpose)
        loaded[name] = LoadedAdapter(name, ad, metas[name], t, str(path), weights_override=image_encoder_weights)
    if purpose != "instruct" and not any(_changes_base(m.get("adapter") or {}) for m in metas.values()):
        base.fuse_projections()  # inference: q/k/v and gate/up as one matmul each
    name = Path(model).stem if os.sep in model or model.endswith((".bin", ".gguf")) else model
    return Stack(base.eval(), tok, resolve_template(template, tok, None, purpose), name, loaded)


def _check_shareable(metas: dict[str, dict[str, Any]]) -> None:
    """V2 bias/scale, trainable norms and bind gates live in the base's own modules, so only one
    such adapter fits a base; prompt adapters (any K, any layers, with or without images) mix."""
    changing = [n for n, m in metas.items() if _changes_base(m.get("adapter") or {})]
    if changing and len(metas) > 1:
        raise ValueError(
            f"adapter {changing[0]!r} changes the base model's modules (V2 bias/scale, trained norms or a bind "
            "network), so it cannot share a base with other adapters; serve it alone, or fold it first with "
            "`llama-adapter convert` (V2 bias/scale)"
        )


def _changes_base(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("bias_scale") or cfg.get("train_norms") or cfg.get("bind_dim"))
