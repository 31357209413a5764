"""The server's engine thread: requests wait in a bounded queue, join the running batch as slots
free up and leave it when they finish or their client goes away. Decoding itself is the one
decode engine (engine.py); this module only schedules and reports.

One background thread owns the model. Rows of any adapter, with or without an image, share
every decode step: each row carries its own precomputed prompt state (`Stack.row_prompt`)
and the engine gathers them per step.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import Engine, Row
from ..generate import stop_ids_of
from ..loading import Stack
from ..sampling import SamplingParams
from ..tokenizer import render_chat

log = logging.getLogger("llama_adapter.serve")


class QueueFull(Exception):
    """The waiting queue is at capacity; the HTTP layer answers 429."""


@dataclass
class Sampling:
    """One request's decoding settings in API terms; `params()` gives the engine's."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens whatever the model says

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=max(self.top_p, 1e-9) if self.top_p < 1.0 else None,
            repetition_penalty=self.repetition_penalty,
            stop=list(self.stop),
            seed=self.seed,
        )


class Job:
    """One generation: built by the HTTP layer, filled in by the engine thread.

    Events go to `sink` (called from the engine thread): ("text", index, delta) and
    ("done", index, finish_reason, prompt_tokens, completion_tokens); finish_reason is "stop",
    "length", "cancelled" or "error: <message>". `tokens` holds the generated token ids.
    """

    def __init__(
        self,
        model: str,
        prompt_ids: list[int],
        sampling: Sampling,
        *,
        image: Any = None,
        index: int = 0,
        sink: Callable[[tuple], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.model = model
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.image = image  # a PIL image for multimodal adapters
        self.index = index
        self.sink = sink
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: tuple) -> None:
        if self.sink is not None:
            try:
                self.sink(event)
            except RuntimeError:  # the client's event loop is gone; nobody is listening
                self.cancel()


class Scheduler:
    """Turns submitted `Job`s into rows of one decode `Engine` over a `Stack`.

    `submit()` is thread-safe and never blocks (raises `QueueFull`); everything that touches the
    model runs on the thread started by `start()`.
    """

    def __init__(
        self,
        stack: Stack,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        max_prompt_tokens: int | None = None,
        step_delay: float = 0.0,
        compile: bool = False,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        self.stack = stack
        ctx = stack.model.config.max_seq_len
        self.max_context = min(max_context or ctx, ctx)
        if self.max_context < 2:
            raise ValueError(f"max_context={self.max_context} leaves no room to generate")
        self.engine = Engine(stack.model, max_batch=max_batch, max_len=self.max_context, compile=compile)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prompt_tokens = min(max_prompt_tokens or self.max_context - 1, self.max_context - 1)
        self.step_delay = step_delay
        self.stop_ids = stop_ids_of(stack.tokenizer)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = collections.Counter()  # tokens, completed, cancelled, errors, rejected

    # -- any thread -----------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self.stack.model

    @property
    def tokenizer(self) -> Any:
        return self.stack.tokenizer

    @property
    def base_name(self) -> str:
        return self.stack.name

    @property
    def models(self) -> list[str]:
        return [self.stack.name, *self.stack.adapters]

    def multimodal(self, model: str) -> bool:
        a = self.stack.adapter(model)
        return a is not None and a.multimodal

    def start(self) -> Scheduler:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="llama-adapter-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none). Raises QueueFull when they do not fit, ValueError for an
        unknown model."""
        for job in jobs:
            if job.model not in self.models:
                raise ValueError(f"unknown model {job.model!r}")
        with self._cv:
            if not self._running:
                raise RuntimeError("engine is not running; call start()")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self.stats["rejected"] += len(jobs)
                raise QueueFull(f"{len(self._waiting)} requests are waiting (limit {self.max_queue})")
            self._waiting.extend(jobs)
            self._cv.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            waiting = len(self._waiting)
        e = self.engine.stats
        counts = {k: self.stats[k] for k in ("tokens", "completed", "cancelled", "errors", "rejected")}
        return {
            "active": len(self.engine.rows), "queued": waiting, "max_batch": self.max_batch,
            "max_queue": self.max_queue, "steps": e["steps"], "row_steps": e["row_steps"], **counts,
            "mean_batch": round(e["row_steps"] / e["steps"], 2) if e["steps"] else 0.0,
        }  # fmt: skip

    def render_chat(self, model: str, messages: list[dict[str, str]]) -> str:
        """Messages as prompt text, in the chat template of `model` (base or adapter)."""
        return render_chat(messages, self.stack.template_of(model), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        tok = self.stack.tokenizer
        return list(tok.encode(text, bos=getattr(tok, "add_bos", True)))

    # -- engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while self._running and not self._waiting and not self.engine.rows:
                        self._cv.wait(0.5)
                    if not self._running:
                        break
                    new = self._take(self.engine.free)
                try:
                    self._finish_rows(self.engine.add(self._rows_for(new)))
                    if self.engine.rows:
                        self._finish_rows(self.engine.step())
                except Exception as e:  # never let one bad batch kill the server
                    log.exception("engine step failed")
                    self._finish_rows(self.engine.cancel_all(f"error: {e}"))
                    for job in new:
                        self._finish(job, f"error: {e}")
                if self.step_delay:
                    time.sleep(self.step_delay)
        self._finish_rows(self.engine.cancel_all())
        with self._cv:
            for job in self._waiting:
                self._finish(job, "cancelled")
            self._waiting.clear()

    def _take(self, free: int) -> list[Job]:
        """Up to `free` waiting jobs, in order (caller holds the lock); cancelled ones end here."""
        taken: list[Job] = []
        while self._waiting and len(taken) < free:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
            else:
                taken.append(job)
        return taken

    def _rows_for(self, jobs: list[Job]) -> list[Row]:
        rows = []
        for job in jobs:
            try:  # a bad image or prompt fails its own job, not the batch
                prompt = self.stack.row_prompt(job.model, job.image)
                row = Row(job.prompt_ids, job.sampling.params(), prompt=prompt, stop_ids=self.stop_ids,
                          tokenizer=self.stack.tokenizer, on_text=_emit_text, on_token=_count_token,
                          cancelled=job.cancelled.is_set, ignore_eos=job.sampling.ignore_eos, tag=job)  # fmt: skip
                self.engine.check(row)
            except Exception as e:  # noqa: BLE001 - reported to the client as this job's error
                self._finish(job, f"error: {e}")
                continue
            rows.append(row)
        return rows

    def _finish_rows(self, rows: list[Row]) -> None:
        for r in rows:
            self.stats["tokens"] += len(r.tokens)
            self._finish(r.tag, r.finish or "cancelled")

    def _finish(self, job: Job, reason: str) -> None:
        if job.done.is_set():
            return
        job.finish_reason = reason
        key = "errors" if reason.startswith("error") else "cancelled" if reason == "cancelled" else "completed"
        self.stats[key] += 1
        job.done.set()
        log.info(
            "job %s model=%s prompt_tokens=%d completion_tokens=%d finish=%s %.3fs", job.id, job.model,
            len(job.prompt_ids), job.completion_tokens, reason, time.perf_counter() - job.t_submit,
        )  # fmt: skip
        job.emit(("done", job.index, reason, len(job.prompt_ids), job.completion_tokens))


def _emit_text(row: Row, delta: str) -> None:
    row.tag.emit(("text", row.tag.index, delta))


def _count_token(row: Row, token: int) -> None:
    job = row.tag
    job.tokens.append(token)
    if job.t_first is None:
        job.t_first = time.perf_counter()
