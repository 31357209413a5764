"""The decode engine: every token this package generates comes from here (generate, chat,
evaluate and the server).

gpt-fast style: a static KV cache, one `prefill` for new rows and then one-token decode steps.
The engine adds what a server needs on top, so `generate` gets it for free:

- **Rows, not a fixed batch.** Each `Row` is one sequence with its own sampling settings, stop
  rules, streaming text decoder and (optionally) its own adapter prompts. Rows join between steps
  (their prompts are prefilled together) and leave as soon as they finish or are cancelled: the
  batch is continuous.
- **No padding.** Row b's token at position p sits in cache slot p of cache row b, so rows of
  different lengths share one cache; a decode step passes per-row positions to the model and a
  mask hides the slots of longer rows. Prompts of a prefill are right-padded, and the pad slots
  they write are overwritten by that row's next tokens before anything reads them.
- **Per-row prompt state** (DESIGN.md section 2): a row carries a precomputed one-row
  `PromptState` (an adapter, an adapter plus an image, or None for the frozen base);
  `adapter.stack_prompts` gathers them into one state per step, so rows of different adapters,
  with and without images, share every step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .adapter import AdaptedLLaMA, PromptState, stack_prompts
from .model import KVCache, LLaMA
from .sampling import Sampler, SamplingParams, StopText

__all__ = ["Row", "Engine"]


class Row:
    """One sequence: its prompt, how to sample, when to stop, and where its output goes.

    `on_text(row, delta)` streams decoded text (needs `tokenizer`), `on_token(row, token)` sees
    every kept token; either may return False to cancel the row. `cancelled` (any callable) is
    polled before every step. When the row ends, `finish` is "stop" (stop token or stop string),
    "length", "cancelled" or "error: ...", and `tokens` / `text` hold what it produced.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        prompt: PromptState | None = None,
        stop_ids: Collection[int] = (),
        tokenizer: Any = None,
        on_text: Callable[[Row, str], Any] | None = None,
        on_token: Callable[[Row, int], Any] | None = None,
        cancelled: Callable[[], bool] | None = None,
        ignore_eos: bool = False,
        tag: Any = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params or SamplingParams()
        self.prompt = prompt
        self.stop_ids = frozenset(stop_ids)
        self.on_text, self.on_token, self.cancelled = on_text, on_token, cancelled
        self.ignore_eos = ignore_eos
        self.tag = tag  # the caller's handle (a job, an index)
        self.decoder = tokenizer.decoder() if tokenizer is not None else None
        self.stops = StopText(self.params.stop)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.max_new = self.params.max_new_tokens  # lowered by the engine to fit the context
        self.pos = 0  # tokens of this row in the cache
        self.next_token = -1  # sampled, not yet fed to the model
        self.sampler: Sampler | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def done(self) -> bool:
        return self.finish is not None

    def _emit(self, delta: str) -> None:
        if delta:
            self.pieces.append(delta)
            if self.on_text is not None and self.on_text(self, delta) is False:
                self.finish = self.finish or "cancelled"

    def accept(self, token: int) -> None:
        """Take one sampled token: keep it, stream it, and decide whether the row is finished."""
        if token in self.stop_ids and not self.ignore_eos:
            return self.end("stop")
        self.tokens.append(token)
        if self.on_token is not None and self.on_token(self, token) is False:
            return self.end("cancelled")
        if self.decoder is not None:
            self._emit(self.stops.push(self.decoder.push(token)))
            if self.stops.hit:
                return self.end("stop")
        if self.finish is None and len(self.tokens) >= self.max_new:
            return self.end("length")
        self.next_token = token

    def end(self, reason: str) -> None:
        """Finish the row; text held back by the decoder or the stop matcher goes out first."""
        if self.finish is not None and self.finish != "cancelled":
            return
        self.finish = self.finish or reason
        if self.decoder is not None and not self.stops.hit and self.finish != "cancelled":
            self._emit(self.stops.push(self.decoder.flush()))
            self._emit(self.stops.flush())


class Engine:
    """Prefill and decode steps for a changing set of rows over one frozen base.

    `model` is the base `LLaMA` (an `AdaptedLLaMA` is unwrapped; its prompts become the default
    row prompt). Adapters wrap the base's attention in place, so one base serves the frozen model
    and every adapter loaded onto it. `max_batch` rows decode together; `max_len` bounds prompt +
    generated tokens per row (default: the model's context). `compile` runs the decode step
    through `torch.compile` (falls back to eager, with a warning, if compiling fails).
    """

    def __init__(
        self, model: nn.Module, *, max_batch: int = 8, max_len: int | None = None, compile: bool = False
    ) -> None:
        self.default_prompt: PromptState | None = None
        if isinstance(model, AdaptedLLaMA):
            with torch.inference_mode():
                self.default_prompt = model.prompt_state(precompute=True)
            model = model.model
        if not isinstance(model, LLaMA):
            raise TypeError(f"Engine needs a LLaMA (or AdaptedLLaMA), got {type(model).__name__}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.rows: list[Row] = []
        self._cache: list[KVCache] | None = None
        self._ctx: PromptState | None = None
        self._ctx_rows: list[Row] | None = None
        self._step = _compiled_step() if compile else _decode_step
        self.stats = {"prefill_tokens": 0, "steps": 0, "row_steps": 0}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    # -- rows in -------------------------------------------------------------------------------

    def check(self, row: Row) -> None:
        """Raise ValueError if the row cannot run here (empty, unknown token ids, too long)."""
        ids, V = row.prompt_ids, self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty; give at least one token (e.g. BOS)")
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"the prompt has token id {bad} outside the vocabulary [0, {V})")
        if len(ids) > self.max_len:
            ctx = self.model.config.max_seq_len
            where = f"the model's context is {ctx}" if self.max_len == ctx else f"this engine holds {self.max_len}"
            raise ValueError(f"prompt has {len(ids)} tokens, {where}; shorten it")

    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill new rows together (up to `free` of them) and sample their first tokens; returns
        the rows that finished right away (a stop token first, or no room to generate)."""
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows do not fit: {self.free} of {self.max_batch} slots are free")
        for row in rows:
            self.check(row)
        if not rows:
            return []
        with torch.inference_mode():
            return self._prefill(list(rows))

    def _prefill(self, rows: list[Row]) -> list[Row]:
        cache = self._ensure_cache()
        n, m = len(self.rows), len(rows)
        lens = [len(r.prompt_ids) for r in rows]
        T = max(lens)
        idx = torch.zeros(m, T, dtype=torch.long)
        for j, r in enumerate(rows):
            idx[j, : lens[j]] = torch.tensor(r.prompt_ids, dtype=torch.long)
            r.max_new = min(r.params.max_new_tokens, self.max_len - lens[j])
            r.pos = lens[j]
            r.sampler = Sampler(r.params, [r.prompt_ids], self.model.config.vocab_size, self.device)
            if r.prompt is None:
                r.prompt = self.default_prompt
        views = [c.rows(n, n + m) for c in cache]
        ctx = stack_prompts([r.prompt for r in rows])
        keep = torch.tensor([x - 1 for x in lens], device=self.device)
        logits = self.model(idx.to(self.device), cache=views, ctx=ctx, keep=keep)[:, 0]
        self.stats["prefill_tokens"] += sum(lens)
        self.rows.extend(rows)
        self._ctx_rows = None
        for r, t in zip(rows, self._sample(logits, rows)):
            if r.max_new <= 0:
                r.end("length")
            else:
                r.accept(t)
        return self._drop_finished()

    # -- steps ---------------------------------------------------------------------------------

    def step(self) -> list[Row]:
        """One token for every active row; returns the rows that finished in this step."""
        for r in self.rows:
            if not r.done and r.cancelled is not None and r.cancelled():
                r.end("cancelled")
        ended = self._drop_finished()
        if not self.rows:
            return ended
        with torch.inference_mode():
            n = len(self.rows)
            if self._ctx_rows != self.rows:
                self._ctx, self._ctx_rows = stack_prompts([r.prompt for r in self.rows]), list(self.rows)
            tok = torch.tensor([[r.next_token] for r in self.rows], device=self.device)
            ps = [r.pos for r in self.rows]
            # Rows in step pass one int: plain cache slices and no data-dependent branch, so a compiled
            # step stays one graph; rows at different positions pass a LongTensor (masked attention).
            pos = ps[0] if ps.count(ps[0]) == n else torch.tensor(ps, device=self.device)
            views = [c.rows(0, n) for c in self._cache]
            logits = self._step(self.model, tok, pos, views, self._ctx)
            self.stats["steps"] += 1
            self.stats["row_steps"] += n
            for r, t in zip(self.rows, self._sample(logits, self.rows)):
                r.pos += 1
                r.accept(t)
        return ended + self._drop_finished()

    def run(self, rows: Iterable[Row]) -> list[Row]:
        """Generate every row to its end, `max_batch` at a time, joining as slots free up."""
        rows = list(rows)
        for r in rows:
            self.check(r)
        waiting = list(rows)
        while waiting or self.rows:
            if waiting and self.free:
                take, waiting = waiting[: self.free], waiting[self.free :]
                self.add(take)
            if self.rows:
                self.step()
        return rows

    def cancel_all(self, reason: str = "cancelled") -> list[Row]:
        for r in self.rows:
            r.end(reason)
        return self._drop_finished()

    # -- internals -----------------------------------------------------------------------------

    def _ensure_cache(self) -> list[KVCache]:
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch, self.max_len)
        return self._cache

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """Greedy rows without a repetition penalty share one argmax; the others sample alone
        (own settings, seed and repetition history)."""
        greedy = [b for b, r in enumerate(rows) if r.sampler.plain_greedy]
        out = [0] * len(rows)
        if greedy:
            picked = logits[greedy].argmax(-1).tolist() if len(greedy) < len(rows) else logits.argmax(-1).tolist()
            for b, t in zip(greedy, picked):
                out[b] = t
        for b, r in enumerate(rows):
            if not r.sampler.plain_greedy:
                out[b] = int(r.sampler(logits[b : b + 1])[0])
        return out

    def _drop_finished(self) -> list[Row]:
        """Free the slots of finished rows: the last row moves into each hole (one cache copy per
        layer), so active rows stay dense in cache rows 0..n-1."""
        ended = [r for r in self.rows if r.done]
        with torch.inference_mode():  # the cache is an inference tensor
            self._compact(ended)
        if ended:
            self._ctx_rows = None
        return ended

    def _compact(self, ended: list[Row]) -> None:
        for r in ended:
            b, last = self.rows.index(r), len(self.rows) - 1
            if b != last:
                for c in self._cache:
                    c.k[b, :, : self.rows[last].pos] = c.k[last, :, : self.rows[last].pos]
                    c.v[b, :, : self.rows[last].pos] = c.v[last, :, : self.rows[last].pos]
                self.rows[b] = self.rows[last]
            self.rows.pop()


def _decode_step(
    model: LLaMA, tok: torch.Tensor, pos: int | torch.Tensor, cache: list[KVCache], ctx: PromptState | None
) -> torch.Tensor:
    """One token per row [B, 1] at position `pos` (every row) or per-row positions [B] -> logits [B, V]."""
    return model(tok, start=pos, cache=cache, ctx=ctx)[:, -1]


def _compiled_step() -> Callable[..., torch.Tensor]:
    """`_decode_step` through `torch.compile`; if compiling or a compiled call fails, warn once and
    run eagerly (a failed step is simply repeated: it rewrites the same cache slots)."""
    import warnings

    state: dict[str, Any] = {"fn": None}

    def fail(e: Exception) -> None:
        warnings.warn(
            f"torch.compile of the decode step failed ({type(e).__name__}: {e}); decoding eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        state["fn"] = _decode_step

    try:
        # dynamic: the positions (and the filled cache length) change every step.
        state["fn"] = torch.compile(_decode_step, dynamic=True)
    except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
        fail(e)

    def step(*args: Any) -> torch.Tensor:
        fn = state["fn"]
        if fn is _decode_step:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            fail(e)
            return _decode_step(*args)

    return step
