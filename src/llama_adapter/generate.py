"""Text generation, gpt-fast style: one `prefill` over the (left-padded) prompts, then
`decode_one_token` steps that each feed one token per row through the static KV cache.

- `generate` works on token ids: batched prompts of different lengths share one cache and one
  position offset; left padding is passed to the model (`pad=`) at every call, so each row sees
  only its own tokens and its RoPE positions start at its first real token. Rows finish on their
  own (stop id or length); a finished row keeps decoding a filler token whose result is ignored,
  and the loop ends when every row is done.
- `generate_text` adds the tokenizer: encoding (with BOS when the model wants it), streaming
  deltas through the tokenizer's incremental decoder, and text-level stop strings.
- `ctx` is handed unchanged to every model call: adapters put their per-call prompt state
  (precomputed prompt K/V) there.
- `image_prompt_state` builds that state for a batch in which each row may or may not have an
  image (multimodal adapters); rows without one get exactly the text-only prompts.
  `encoder_weights` finds the image encoder checkpoint an adapter was trained with.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SamplingParams",
    "Sampler",
    "StopText",
    "prefill",
    "decode_one_token",
    "generate",
    "generate_text",
    "encoder_weights",
    "image_prompt_state",
]

_FILLER = 0  # token fed for left padding and for rows that have finished (their results are ignored)
_ROW_DONE = object()  # internal per-token hook result: this row is finished, the others go on


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (top_k/top_p are then irrelevant);
    `repetition_penalty` (CTRL-style, > 1 discourages repeats) applies in both modes.
    `stop` strings are matched on text, so only `generate_text` uses them."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is negative; use 0 or more")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None to disable)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (or None to disable)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


class Sampler:
    """Turns last-position logits [B, V] into next tokens [B], remembering what each row has seen
    (prompt + generated) for the repetition penalty. Seeded through its own `torch.Generator`, so
    a seed reproduces the same tokens whatever else uses the global RNG."""

    def __init__(self, params: SamplingParams, prompts: Sequence[Sequence[int]], vocab_size: int, device: Any) -> None:
        self.p = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for b, ids in enumerate(prompts):
                self.seen[b, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
            self.rows = torch.arange(len(prompts), device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        logits = logits.float()
        if self.seen is not None:
            r = p.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if p.temperature <= 0:
            tok = logits.argmax(-1)
        else:
            tok = self._sample(logits / p.temperature)
        if self.seen is not None:
            self.seen[self.rows, tok] = True
        return tok

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.top_k is not None and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if p.top_p is not None and p.top_p < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[:, 0] = False
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


class StopText:
    """Streams text while holding back any tail that could begin a stop string, and cuts at the
    first complete one, so what it emits never contains any part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Text that is now safe to emit; sets `hit` (and emits nothing more) once a stop matched."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[: min(found)], "", True
            return out
        hold = 0  # longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out

    def flush(self) -> str:
        """End of text: a held tail that never became a stop string is ordinary text."""
        out, self.buf = ("" if self.hit else self.buf), ""
        return out


def prefill(
    model: nn.Module, idx: torch.Tensor, cache: list, pad: torch.Tensor | None = None, ctx: Any = None
) -> torch.Tensor:
    """Whole (left-padded) prompts [B, T] at positions 0..T-1 -> logits of the last position [B, V]."""
    return model(idx, start=0, cache=cache, pad=pad, ctx=ctx, last_only=True)[:, -1]


def decode_one_token(
    model: nn.Module, idx: torch.Tensor, start: int, cache: list, pad: torch.Tensor | None = None, ctx: Any = None
) -> torch.Tensor:
    """One token per row [B, 1] at position `start` -> logits [B, V]."""
    return model(idx, start=start, cache=cache, pad=pad, ctx=ctx)[:, -1]


class _CompiledStep:
    """`decode_one_token` through `torch.compile`; if compiling fails, warn once and run eagerly.
    A failed step is simply repeated eagerly: it rewrites the same cache slot with the same values."""

    def __init__(self, device: torch.device) -> None:
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.fn: Callable[..., torch.Tensor] = decode_one_token
        try:
            # dynamic: the position (and the filled cache length) changes every step.
            self.fn = torch.compile(decode_one_token, mode=mode, dynamic=True)
        except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        warnings.warn(
            f"torch.compile of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        self.fn = decode_one_token

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.fn is decode_one_token:
            return decode_one_token(*args)
        try:
            return self.fn(*args)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            return decode_one_token(*args)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts given; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def _generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_ids: Collection[int],
    ctx: Any,
    on_token: Callable[[int, int], Any] | None,
    compile: bool,
) -> list[list[int]]:
    """The decode loop. `on_token(row, token)` sees every kept token; it returns False to stop
    everything, `_ROW_DONE` to finish that row, anything else to go on."""
    config = model.config
    _check_prompts(prompts, config.vocab_size)
    B, lens = len(prompts), [len(p) for p in prompts]
    L = max(lens)
    if L > config.max_seq_len:
        raise ValueError(f"prompt has {L} tokens, the model's context is {config.max_seq_len}; shorten it")
    max_new = min(params.max_new_tokens, config.max_seq_len - L)
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new <= 0:
        return out
    device = _device(model)
    stop_ids = frozenset(stop_ids)
    step = _CompiledStep(device) if compile else decode_one_token

    with torch.inference_mode():
        if ctx is None and hasattr(model, "prompt_state"):
            ctx = model.prompt_state(precompute=True)  # an adapter's prompt K/V, once per call
        idx = torch.tensor([[_FILLER] * (L - n) + list(p) for n, p in zip(lens, prompts)], device=device)
        pad = torch.tensor([L - n for n in lens], device=device)
        cache = model.new_cache(B, L + max_new)
        sampler = Sampler(params, prompts, config.vocab_size, device)
        done = [False] * B
        finished: torch.Tensor | None = None  # [B, 1] rows that feed the filler token
        tok = sampler(prefill(model, idx, cache, pad, ctx))
        for i in range(max_new):
            changed = False
            for b, t in enumerate(tok.tolist()):
                if done[b]:
                    continue
                if t in stop_ids:
                    done[b] = changed = True
                    continue
                out[b].append(t)
                if on_token is not None:
                    r = on_token(b, t)
                    if r is False:
                        return out
                    if r is _ROW_DONE:
                        done[b] = changed = True
            if all(done) or i == max_new - 1:
                break
            if changed:
                finished = torch.tensor(done, device=device)[:, None]
            cur = tok[:, None] if finished is None else tok[:, None].masked_fill(finished, _FILLER)
            tok = sampler(step(model, cur, L + i, cache, pad, ctx))
    return out


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    stop_ids: Collection[int] = (),
    ctx: Any = None,
    callback: Callable[[int, int], bool | None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids; lengths may differ).

    A row ends at its first token in `stop_ids` (not included) or after `max_new_tokens` (clamped
    so that prompt + new tokens fit the model's context). `callback(row, token)` is called for
    every kept token as it is produced; returning False stops the whole generation (e.g. the
    client went away) and returns what was produced so far. `compile=True` runs the decode step
    through `torch.compile` (falls back to eager with a warning if that fails).
    """
    params = params or SamplingParams()
    hook = None
    if callback is not None:

        def hook(row: int, token: int) -> Any:
            return False if callback(row, token) is False else None

    return _generate(model, prompts, params, stop_ids, ctx, hook, compile)


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    params: SamplingParams | None = None,
    *,
    ctx: Any = None,
    on_text: Callable[[int, str], None] | None = None,
    add_bos: bool | None = None,
    stop_ids: Collection[int] | None = None,
    compile: bool = False,
) -> list[str]:
    """Completions of text prompts, streamed as deltas to `on_text(row, delta)`.

    Prompts start with BOS when `add_bos` says so (default: the tokenizer's `add_bos`, if it has a
    BOS token). Rows stop at the tokenizer's stop tokens (or `stop_ids`) and at the first
    occurrence of any of `params.stop`, which is cut off; text that could be the start of a stop
    string is held back, so the streamed deltas never contain part of one and always concatenate
    to the returned text.
    """
    params = params or SamplingParams()
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos", True))
    add_bos = add_bos and getattr(tokenizer, "bos_id", None) is not None
    ids = [tokenizer.encode(p, bos=add_bos) for p in prompts]
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "stop_ids", None) or ({tokenizer.eos_id} - {None})
    decoders = [tokenizer.decoder() for _ in ids]
    stops = [StopText(params.stop) for _ in ids]
    texts: list[list[str]] = [[] for _ in ids]

    def emit(row: int, delta: str) -> None:
        if delta:
            texts[row].append(delta)
            if on_text is not None:
                on_text(row, delta)

    def on_token(row: int, token: int) -> Any:
        emit(row, stops[row].push(decoders[row].push(token)))
        return _ROW_DONE if stops[row].hit else None

    _generate(model, ids, params, stop_ids, ctx, on_token, compile)
    for row in range(len(ids)):
        s = stops[row]
        emit(row, s.push(decoders[row].flush()))
        emit(row, s.flush())
    return ["".join(t) for t in texts]


# --------------------------------------------------------------------------------------------
# Images for multimodal adapters
# --------------------------------------------------------------------------------------------


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
    model: nn.Module,
    images: Sequence[Any],
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    features: torch.Tensor | None = None,
) -> Any:
    """A precomputed `PromptState` for a batch whose rows each have an image (path or PIL image)
    or None. Rows without an image add nothing to the prompts (`has_image` False), so they
    generate exactly what the text-only adapter generates. `features` [B, visual_dim] skips the
    encoder (rows without an image are ignored there). Returns None for a plain model with no
    images; raises ValueError when images are given to a model that cannot use them."""
    from .adapter import AdaptedLLaMA

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
        from .multimodal import image_features_for

        features = torch.zeros(len(images), cfg.visual_dim, device=device)
        got = image_features_for(model, [images[i] for i in rows], weights=weights, cache_dir=cache_dir)
        features[rows] = got.to(device=device, dtype=features.dtype)
    has = torch.zeros(len(images), dtype=torch.bool, device=device)
    has[rows] = True
    return model.prompt_state(visual=features.to(device), has_image=has, precompute=True)
