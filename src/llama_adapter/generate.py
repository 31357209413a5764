"""Text generation for a list of prompts, over the one decode engine (engine.py).

- `generate` works on token ids: prompts of different lengths share one cache (no padding);
  rows finish on their own (stop id or length) and leave the batch.
- `generate_text` adds the tokenizer: encoding (with BOS when the model wants it), streaming
  deltas through the tokenizer's incremental decoder, and text-level stop strings.
- `ctx` is an adapter's `PromptState` for the batch (`[1, ...]` for every row or `[B, ...]` per
  row, e.g. from `loading.image_prompt_state`); by default an adapter's own prompts are used.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from torch import nn

from .adapter import PromptState
from .engine import Engine, Row
from .sampling import Sampler, SamplingParams, StopText

__all__ = ["SamplingParams", "Sampler", "StopText", "generate", "generate_text", "make_rows", "run_rows"]


def make_rows(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    stop_ids: Collection[int] = (),
    ctx: PromptState | None = None,
    tokenizer: Any = None,
) -> list[Row]:
    """One engine `Row` per prompt; row b takes row b of a batched `ctx`."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one list of token ids")
    return [
        Row(ids, params, prompt=None if ctx is None else ctx.row(b), stop_ids=stop_ids, tokenizer=tokenizer, tag=b)
        for b, ids in enumerate(prompts)
    ]


def run_rows(model: nn.Module, rows: list[Row], *, compile: bool = False, max_batch: int | None = None) -> list[Row]:
    """Decode `rows` to their ends on a fresh engine sized for them (the whole batch at once
    unless `max_batch` is smaller)."""
    ctx = getattr(model, "model", model).config.max_seq_len
    longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in rows)
    engine = Engine(model, max_batch=max_batch or len(rows), max_len=min(longest, ctx), compile=compile)
    return engine.run(rows)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    stop_ids: Collection[int] = (),
    ctx: PromptState | None = None,
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
    rows = make_rows(prompts, params, stop_ids=stop_ids, ctx=ctx)
    _stop_all_on_false(rows, callback)
    return [r.tokens for r in run_rows(model, rows, compile=compile)]


def _stop_all_on_false(rows: list[Row], callback: Callable[[int, int], Any] | None) -> None:
    if callback is None:
        return
    stopped = [False]

    def on_token(row: Row, token: int) -> bool:
        if callback(row.tag, token) is False:
            stopped[0] = True
        return not stopped[0]

    for r in rows:
        r.on_token = on_token
        r.cancelled = lambda: stopped[0]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """Token ids of text prompts, with BOS when `add_bos` says so (default: the tokenizer's
    `add_bos`, if it has a BOS token)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos", True))
    add_bos = add_bos and getattr(tokenizer, "bos_id", None) is not None
    return [tokenizer.encode(p, bos=add_bos) for p in prompts]


def stop_ids_of(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "stop_ids", None) or ({tokenizer.eos_id} - {None}))


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    params: SamplingParams | None = None,
    *,
    ctx: PromptState | None = None,
    on_text: Callable[[int, str], None] | None = None,
    add_bos: bool | None = None,
    stop_ids: Collection[int] | None = None,
    compile: bool = False,
) -> list[str]:
    """Completions of text prompts, streamed as deltas to `on_text(row, delta)`.

    Rows stop at the tokenizer's stop tokens (or `stop_ids`) and at the first occurrence of any
    of `params.stop`, which is cut off; text that could be the start of a stop string is held
    back, so the streamed deltas never contain part of one and always concatenate to the
    returned text.
    """
    params = params or SamplingParams()
    ids = encode_prompts(tokenizer, prompts, add_bos)
    stops = stop_ids_of(tokenizer) if stop_ids is None else stop_ids
    rows = make_rows(ids, params, stop_ids=stops, ctx=ctx, tokenizer=tokenizer)
    if on_text is not None:
        for r in rows:
            r.on_text = lambda row, delta: on_text(row.tag, delta)
    return [r.text for r in run_rows(model, rows, compile=compile)]
