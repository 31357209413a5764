"""Assemble what a command needs to talk to a model: base weights + tokenizer + adapters + chat
template (+ image encoders for multimodal adapters). `generate`, `chat`, `evaluate`, `serve` and
`finetune` all come through here, so the rules live in one place:

- `resolve_template`: which prompt template a run uses (the one rule, see its docstring);
- `load_stack`: load everything, check adapters against the base, refuse combinations that
  cannot share one base (two adapters that both change base modules, V2/ImageBind);
- `Stack.row_prompt`: the per-row adapter prompt state (with an image, if any) that the decode
  engine gathers into a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import AdaptedLLaMA, PromptState, load_adapter, read_adapter_config
from .checkpoint import load_model
from .model import LLaMA
from .multimodal import image_features_for
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


def image_prompt_state(
    model: Any,
    images: list[Any],
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    features: torch.Tensor | None = None,
) -> PromptState | None:
    """A precomputed `PromptState` [B, ...] for a batch whose rows each have an image (path or PIL
    image) or None. Rows without an image add nothing to the prompts, so they generate exactly
    what the text-only adapter generates. `features` [B, visual_dim] skips the encoder. Returns
    None for a plain model with no images; ValueError when images go to a model that cannot use
    them."""
    rows = [i for i, im in enumerate(images) if im is not None]
    if not isinstance(model, AdaptedLLaMA):
        if rows:
            raise ValueError("images need a multimodal adapter (--adapter DIR trained with --image-encoder)")
        return None
    if not rows and features is None:
        return model.prompt_state(precompute=True)
    cfg = model.adapter_config
    if not cfg.visual_dim:
        raise ValueError(
            "this adapter is text-only (trained without --image-encoder); drop the image or use a multimodal adapter"
        )
    device = next(model.parameters()).device
    if features is None:
        features = torch.zeros(len(images), cfg.visual_dim, device=device)
        got = image_features_for(model, [images[i] for i in rows], weights=weights, cache_dir=cache_dir)
        features[rows] = got.to(device=device, dtype=features.dtype)
    has = torch.zeros(len(images), dtype=torch.bool, device=device)
    has[rows] = True
    return model.prompt_state(visual=features.to(device), has_image=has, precompute=True)


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

    @property
    def multimodal(self) -> bool:
        return self.model.adapter_visual is not None

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

    def row_prompt(self, name: str | None, image: Any = None) -> PromptState | None:
        """One row's precomputed prompt state: adapter `name` (None = the frozen base), with an
        image (a path or PIL image) for a multimodal adapter."""
        return self.batch_prompt(name, [image])

    def batch_prompt(self, name: str | None, images: list[Any]) -> PromptState | None:
        """The prompt state [B, ...] of rows of one adapter, each with an image or None (the
        encoder runs once for the whole batch)."""
        a = self.adapter(name)
        if a is None:
            if any(im is not None for im in images):
                raise ValueError(f"model {name or self.name!r} takes no images; pick a multimodal adapter")
            return None
        if all(im is None for im in images):
            return a.model.prompt_state(precompute=True)
        if not a.multimodal:
            raise ValueError(f"adapter {a.name!r} is text-only; it takes no images")
        return image_prompt_state(a.model, images, weights=a.image_weights())


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
) -> Stack:
    """Load a base model (a `checkpoint.load_model` spec), its tokenizer (next to the weights, or
    `tokenizer`) and adapters ({name: directory}, or one directory) onto that one base."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    base = load_model(model, dtype=dtype)
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
