"""OpenAI-compatible HTTP server and a web chat page for a base model plus any number of adapters.

    llama-adapter serve --model stories260k --adapter tiny=runs/tiny --port 8000

One background thread owns the model (`Engine`) and runs continuous batching: requests wait in a
bounded queue (429 + Retry-After when it is full), are prefilled together as they arrive and then
join the running batch, whose rows share one decode step per token even when they use different
adapters or images: each row's prompt K/V and gate are gathered into one per-row `PromptState`
(DESIGN.md section 2). A row that joins late is left-padded into the shared KV cache so that its
last prompt token sits just before the batch's write position; RoPE positions are per row, so
nothing is recomputed. Rows leave as soon as they finish or their client goes away, and their
slot is reused at the next step.

The HTTP layer (`build_app`) is FastAPI: `/v1/chat/completions`, `/v1/completions` (both with
`stream: true` as server-sent events), `/v1/models`, `/health` and the page at `/`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .adapter import AdaptedLLaMA, LayerPrompt, PromptState
from .generate import Sampler, SamplingParams, StopText, encoder_weights
from .model import KVCache, LLaMA

log = logging.getLogger("llama_adapter.serve")

# ---------------------------------------------------------------------------------------------
# The engine: model + tokenizer + adapters, one thread, continuous batching
# ---------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """The waiting queue is at capacity; the HTTP layer answers 429."""


@dataclass
class Sampling:
    """One request's decoding settings in API terms; `params()` gives generate.py's."""

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
    "length", "cancelled" or "error: <message>".
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
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: tuple) -> None:
        if self.sink is not None:
            try:
                self.sink(event)
            except RuntimeError:  # the client's event loop is gone; nobody is listening
                self.cancel()


@dataclass
class _Row:
    job: Job
    next_token: int
    decoder: Any
    stops: StopText
    sampler: Sampler
    prompt: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # layer -> (k, v, gate)
    prompt_len: int  # adapter_len K of its prompts (rows with different K cannot share a step)


@dataclass
class ModelEntry:
    name: str
    adapter: AdaptedLLaMA | None
    template: str  # chat template name for /v1/chat/completions
    image_encoder: Callable[[list[Any]], torch.Tensor] | None = None  # PIL images -> [B, visual_dim]

    @property
    def multimodal(self) -> bool:
        return self.adapter is not None and self.adapter.adapter_visual is not None


class Engine:
    """Owns the model, tokenizer and adapters; turns submitted `Job`s into batched decode steps.

    `submit()` is thread-safe and never blocks (raises `QueueFull`); everything that touches the
    model runs on the engine thread started by `start()`.
    """

    def __init__(
        self,
        model: LLaMA,
        tokenizer: Any,
        *,
        name: str | None = None,
        adapters: dict[str, AdaptedLLaMA] | None = None,
        template: str = "plain",
        adapter_templates: dict[str, str] | None = None,
        image_encoders: dict[str, Callable[[list[Any]], torch.Tensor]] | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        max_prompt_tokens: int | None = None,
        step_delay: float = 0.0,
    ) -> None:
        if isinstance(model, AdaptedLLaMA):
            raise ValueError("pass the base LLaMA as `model` and adapters as `adapters={name: AdaptedLLaMA}`")
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = name or model.config.name
        self.models: dict[str, ModelEntry] = {self.base_name: ModelEntry(self.base_name, None, template)}
        for aname, ad in (adapters or {}).items():
            if aname in self.models:
                raise ValueError(f"adapter name {aname!r} is used twice (or equals the base model's name)")
            if ad.model is not model:
                raise ValueError(f"adapter {aname!r} wraps a different base model object; load it onto `model`")
            enc = (image_encoders or {}).get(aname)
            self.models[aname] = ModelEntry(aname, ad.eval(), (adapter_templates or {}).get(aname, template), enc)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_context = min(max_context or model.config.max_seq_len, model.config.max_seq_len)
        if self.max_context < 2:
            raise ValueError(f"max_context={self.max_context} leaves no room to generate")
        self.max_prompt_tokens = min(max_prompt_tokens or self.max_context - 1, self.max_context - 1)
        self.step_delay = step_delay
        self.stop_ids = set(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])

        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._thread: threading.Thread | None = None
        self._running = False
        # Batch state (engine thread only).
        self._rows: list[_Row] = []
        self._cache: list[KVCache] | None = None
        self._pads: list[int] = []
        self._pos = 0  # next cache slot to write, shared by all rows
        self._ctx: PromptState | None = None
        self._ctx_dirty = True
        self.stats = collections.Counter()  # steps, row_steps, tokens, completed, cancelled, errors, ...

    # -- public, any thread ------------------------------------------------------------------

    def start(self) -> Engine:
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
        return {
            "active": len(self._rows),
            "queued": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            **{
                k: self.stats[k]
                for k in ("steps", "row_steps", "tokens", "completed", "cancelled", "errors", "rejected")
            },
            "mean_batch": round(self.stats["row_steps"] / self.stats["steps"], 2) if self.stats["steps"] else 0.0,
        }

    def render_chat(self, model: str, messages: list[dict[str, str]]) -> str:
        """Messages as prompt text, in the chat template of `model` (base or adapter)."""
        from .tokenizer import render_chat

        return render_chat(messages, self.models[model].template, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, bos=getattr(self.tokenizer, "add_bos", True)))

    # -- engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while self._running and not self._waiting and not self._rows:
                        self._cv.wait(0.5)
                    if not self._running:
                        break
                    new = self._take_admissible()
                try:
                    if new:
                        self._admit(new)
                    if self._rows:
                        self._step()
                except Exception as e:  # never let one bad batch kill the server
                    log.exception("engine step failed")
                    for row in self._rows:
                        self._finish(row.job, f"error: {e}")
                    for job in new:
                        if not job.done.is_set():
                            self._finish(job, f"error: {e}")
                    self._reset_batch()
                if self.step_delay:
                    time.sleep(self.step_delay)
        for row in self._rows:
            self._finish(row.job, "cancelled")
        with self._cv:
            for job in self._waiting:
                self._finish(job, "cancelled")
            self._waiting.clear()
        self._reset_batch()

    def _take_admissible(self) -> list[Job]:
        """Jobs that can join the batch now (caller holds the lock). Rows of adapters with different
        prompt lengths K cannot share a step; such a job waits, in order, until the batch drains."""
        free = self.max_batch - len(self._rows)
        ks = {r.prompt_len for r in self._rows if r.prompt is not None}
        taken, kept = [], collections.deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            ad = self.models[job.model].adapter
            k = ad.adapter_config.adapter_len if ad is not None else None
            if len(taken) < free and (k is None or not ks or k in ks):
                taken.append(job)
                if k is not None:
                    ks.add(k)
            else:
                kept.append(job)
        self._waiting = kept
        return taken

    def _row_prompt(self, job: Job) -> tuple[dict | None, int]:
        entry = self.models[job.model]
        if entry.adapter is None:
            if job.image is not None:
                raise ValueError(f"model {job.model!r} takes no images")
            return None, 0
        kwargs = {}
        if job.image is not None:
            if not entry.multimodal or entry.image_encoder is None:
                raise ValueError(f"adapter {job.model!r} is text-only; it takes no images")
            kwargs["visual"] = entry.image_encoder([job.image])
        state = entry.adapter.prompt_state(precompute=True, **kwargs)
        prompt = {i: (lp.kv[0], lp.kv[1], lp.gate) for i, lp in state.layers.items()}
        return prompt, entry.adapter.adapter_config.adapter_len

    def _gather(self, rows: list[_Row]) -> PromptState | None:
        """One PromptState for a batch: per-row prompt K/V and gates; rows without an adapter (or
        without this layer) get gate 0, so their prompt branch adds exactly nothing."""
        layers = sorted({i for r in rows if r.prompt for i in r.prompt})
        if not layers:
            return None
        state = PromptState()
        for i in layers:
            ref = next(r.prompt[i] for r in rows if r.prompt and i in r.prompt)
            ks, vs, gs = [], [], []
            for r in rows:
                k, v, g = r.prompt[i] if r.prompt and i in r.prompt else (ref[0], ref[1], torch.zeros_like(ref[2]))
                ks.append(k)
                vs.append(v)
                gs.append(g)
            k, v, g = torch.cat(ks), torch.cat(vs), torch.cat(gs)
            state.layers[i] = LayerPrompt(prompt=k.new_zeros(0), gate=g, kv=(k, v))
        return state

    def _ensure_cache(self) -> list[KVCache]:
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch, self.max_context)
        return self._cache

    def _shift(self, delta: int) -> None:
        """Move every active row's cached keys `delta` slots (left if negative); positions are per
        row (slot - pad), so the keys stay valid."""
        if delta == 0:
            return
        n, pos = len(self._rows), self._pos
        if n:
            lo = min(self._pads)
            for c in self._cache:
                for t in (c.k, c.v):
                    t[:n, :, lo + delta : pos + delta] = t[:n, :, lo:pos].clone()
        self._pads = [p + delta for p in self._pads]
        self._pos = pos + delta

    def _admit(self, jobs: list[Job]) -> None:
        cache = self._ensure_cache()
        rows, ids = [], []
        for job in jobs:
            try:
                prompt, k = self._row_prompt(job)
            except Exception as e:
                self._finish(job, f"error: {e}")
                continue
            params = job.sampling.params()
            sampler = Sampler(params, [job.prompt_ids], self.model.config.vocab_size, self.model.output.weight.device)
            rows.append(_Row(job, -1, self.tokenizer.decoder(), StopText(params.stop), sampler, prompt, k))
            ids.append(job.prompt_ids)
        if not rows:
            return
        # Prefill the newcomers together, left-padded, in a cache of their own.
        m, L = len(rows), max(len(x) for x in ids)
        dev = self.model.tok_embeddings.weight.device
        idx = torch.zeros(m, L, dtype=torch.long, device=dev)
        for j, x in enumerate(ids):
            idx[j, L - len(x) :] = torch.tensor(x, dtype=torch.long)
        pad = torch.tensor([L - len(x) for x in ids], device=dev)
        tmp = self.model.new_cache(m, L)
        logits = self.model(idx, start=0, cache=tmp, pad=pad, ctx=self._gather(rows), last_only=True)[:, -1]
        self.stats["prefill_tokens"] += sum(len(x) for x in ids)
        # Make room: drop the common left padding of the running rows, then make sure the longest
        # newcomer fits before the write position.
        lo = min(self._pads) if self._rows else self._pos
        self._shift(max(self._pos - lo, L) - self._pos)
        pos = self._pos
        for j, row in enumerate(rows):
            b, n = len(self._rows), len(ids[j])
            for c, t in zip(cache, tmp):
                c.k[b, :, pos - n : pos] = t.k[j, :, L - n :]
                c.v[b, :, pos - n : pos] = t.v[j, :, L - n :]
            self._rows.append(row)
            self._pads.append(pos - n)
        self._ctx_dirty = True
        self._accept(rows, self._sample(logits, rows))

    def _step(self) -> None:
        for b in reversed(range(len(self._rows))):
            if self._rows[b].job.cancelled.is_set():
                self._finish(self._rows[b].job, "cancelled")
                self._remove(b)
        if not self._rows:
            return
        n = len(self._rows)
        if self._pos >= self.max_context:
            self._shift(-min(self._pads))
            self.stats["compactions"] += 1
        if self._ctx_dirty:
            self._ctx = self._gather(self._rows)
            self._ctx_dirty = False
        dev = self.model.tok_embeddings.weight.device
        idx = torch.tensor([[r.next_token] for r in self._rows], dtype=torch.long, device=dev)
        views = []
        for c in self._cache:
            v = KVCache.__new__(KVCache)
            v.k, v.v = c.k[:n], c.v[:n]
            views.append(v)
        pad = torch.tensor(self._pads, device=dev)
        logits = self.model(idx, start=self._pos, cache=views, pad=pad, ctx=self._ctx)[:, -1]
        self._pos += 1
        self.stats["steps"] += 1
        self.stats["row_steps"] += n
        self._accept(list(self._rows), self._sample(logits, self._rows))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row with its own `generate.Sampler` (settings, seed, repetition history)."""
        return [int(row.sampler(logits[b : b + 1])[0]) for b, row in enumerate(rows)]

    def _accept(self, rows: list[_Row], tokens: list[int]) -> None:
        finished = []
        for row, tok in zip(rows, tokens):
            job, s = row.job, row.job.sampling
            job.completion_tokens += 1
            self.stats["tokens"] += 1
            if job.t_first is None:
                job.t_first = time.perf_counter()
            reason = None
            if tok in self.stop_ids and not s.ignore_eos:
                reason = "stop"
            else:
                text = row.stops.push(row.decoder.push(tok))
                if text:
                    job.emit(("text", job.index, text))
                if row.stops.hit:
                    reason = "stop"
                elif job.completion_tokens >= s.max_tokens:
                    reason = "length"
            if reason is None:
                row.next_token = tok
                continue
            if not row.stops.hit:  # end of text: what the decoder and the stop matcher hold goes out
                tail = row.stops.push(row.decoder.flush())
                tail += row.stops.flush()
                if tail:
                    job.emit(("text", job.index, tail))
            self._finish(job, reason)
            finished.append(row)
        for row in finished:
            self._remove(self._rows.index(row))

    def _remove(self, b: int) -> None:
        """Free batch slot b: the last row moves into it (one copy per layer), slots stay dense."""
        last = len(self._rows) - 1
        if b != last:
            for c in self._cache:
                c.k[b] = c.k[last]
                c.v[b] = c.v[last]
            self._rows[b], self._pads[b] = self._rows[last], self._pads[last]
        self._rows.pop()
        self._pads.pop()
        self._ctx_dirty = True
        if not self._rows:
            self._pos = 0

    def _reset_batch(self) -> None:
        self._rows, self._pads, self._pos, self._ctx, self._ctx_dirty = [], [], 0, None, True

    def _finish(self, job: Job, reason: str) -> None:
        if job.done.is_set():
            return
        job.finish_reason = reason
        key = "errors" if reason.startswith("error") else "cancelled" if reason == "cancelled" else "completed"
        self.stats[key] += 1
        job.done.set()
        elapsed = time.perf_counter() - job.t_submit
        log.info(
            "job %s model=%s prompt_tokens=%d completion_tokens=%d finish=%s %.3fs",
            job.id, job.model, len(job.prompt_ids), job.completion_tokens, reason, elapsed,
        )  # fmt: skip
        job.emit(("done", job.index, reason, len(job.prompt_ids), job.completion_tokens))


def load_engine(
    model: str,
    adapters: dict[str, str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    template: str = "auto",
    **engine_kwargs: Any,
) -> Engine:
    """Load a base model (a `checkpoint.load_model` spec), its tokenizer and adapters
    {name: directory} onto the same base, as `llama-adapter serve` does."""
    from .adapter import load_adapter, read_adapter_config
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    base = load_model(model, dtype=dtype)
    if device:
        base = base.to(device)
    tok = load_tokenizer(base.config.extra["tokenizer"])
    if template == "auto":
        template = "chatml" if getattr(tok, "chat_template", "") == "chatml" else "plain"
    loaded, templates, encoders = {}, {}, {}
    for name, path in (adapters or {}).items():
        meta = read_adapter_config(path)
        ad = load_adapter(base, path).to(dtype)
        loaded[name] = ad
        templates[name] = meta.get("template") or ("alpaca" if template == "plain" else template)
        if ad.adapter_visual is not None:  # with the local encoder checkpoint finetune recorded, if any
            encoders[name] = _image_encoder_for(ad, encoder_weights(path, meta))
    name = Path(model).stem if os.sep in model or model.endswith((".bin", ".gguf")) else model
    return Engine(
        base, tok, name=name, adapters=loaded, template=template, adapter_templates=templates,
        image_encoders=encoders, **engine_kwargs,
    )  # fmt: skip


def _image_encoder_for(adapter: AdaptedLLaMA, weights: str | None = None) -> Callable[[list[Any]], torch.Tensor]:
    from . import multimodal

    return lambda images: multimodal.image_features_for(adapter, images, weights=weights)


# ---------------------------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServeOptions:
    api_key: str | None = None
    max_body_bytes: int = 8 << 20  # room for one base64 image
    local_image_root: str | None = None  # image_url may name files under this directory
    default_max_tokens: int = 256
    retry_after_s: int = 1


def _number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise APIError(400, f"'{key}' must be a{'n integer' if integer else ' number'}, got {v!r}", param=key)
    if not lo <= v <= hi:
        raise APIError(400, f"'{key}'={v} is out of range [{lo}, {hi}]", param=key)
    return v


def _sampling(body: dict, default_max_tokens: int) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, 1, 1 << 30, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
        top_k=_number(body, "top_k", None, 0, 1 << 30, integer=True) or None,
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0)),
        stop=stop,
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def _load_image(url: str, local_root: str | None) -> Any:
    """An image_url: a base64 data: URL, or (only when the server allows it) a file under one directory."""
    from PIL import Image

    from .multimodal import MAX_IMAGE_PIXELS, open_image, to_rgb

    if url.startswith(("http://", "https://")):
        raise APIError(400, "remote image URLs are not fetched; send a data: URL", param="image_url")
    if not url.startswith("data:"):
        if local_root is None:
            raise APIError(
                400,
                "local image paths are disabled; send a data: URL or start the server with --allow-local-images DIR",
                param="image_url",
            )
        root = Path(local_root).resolve()
        path = (root / Path(url.removeprefix("file://")).expanduser()).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise APIError(400, f"image {url!r} is not a file under the allowed directory", param="image_url")
        try:
            return open_image(path)
        except ValueError as e:
            raise APIError(400, str(e), param="image_url") from e
    header, _, payload = url.partition(",")
    if ";base64" not in header or not header[5:].startswith("image/"):
        raise APIError(400, "image data URLs must look like data:image/<type>;base64,<data>", param="image_url")
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                raise APIError(400, f"image is {im.size[0]}x{im.size[1]} pixels; downscale it", param="image_url")
            im.load()
            return to_rgb(im)
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(400, f"could not decode the image data URL ({type(e).__name__}: {e})", param="image_url") from e


def _chat_messages(body: dict, local_root: str | None) -> tuple[list[dict[str, str]], Any]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out, images = [], []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise APIError(400, "image_url parts need {'url': ...}", param="messages")
                    images.append(_load_image(url, local_root))
                else:
                    raise APIError(400, f"unsupported content part {kind!r}; use text or image_url", param="messages")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string or a list of parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    if len(images) > 1:
        raise APIError(400, "at most one image per request is supported", param="messages")
    return out, images[0] if images else None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def build_app(engine: Engine, options: ServeOptions | None = None, *, manage_engine: bool = True) -> Any:
    """The FastAPI app. With `manage_engine` the app starts and stops the engine thread."""
    from contextlib import asynccontextmanager

    opts = options or ServeOptions()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="llama-adapter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:12]
        request.state.rid = rid
        try:
            if request.url.path.startswith("/v1/") and opts.api_key is not None:
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), opts.api_key.encode()):
                    raise APIError(
                        401,
                        "missing or wrong API key; send 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
            response = await call_next(request)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        response.headers["x-request-id"] = rid
        log.info(
            "%s %s %s %d %.1fms",
            rid,
            request.method,
            request.url.path,
            response.status_code,
            1000 * (time.perf_counter() - t0),
        )
        return response

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body_bytes:
            raise APIError(413, f"request body is larger than {opts.max_body_bytes} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > opts.max_body_bytes:
                raise APIError(413, f"request body is larger than {opts.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def pick_model(body: dict) -> str:
        name = body.get("model")
        if name is None or name == "":
            return engine.base_name
        if not isinstance(name, str) or name not in engine.models:
            raise APIError(
                404,
                f"model {name!r} does not exist; available: {', '.join(engine.models)}",
                param="model",
                code="model_not_found",
            )
        return name

    def check_prompt(ids: list[int], sampling: Sampling) -> None:
        if len(ids) > engine.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt is {len(ids)} tokens; this server accepts at most {engine.max_prompt_tokens}",
                param="messages",
                code="context_length_exceeded",
            )
        sampling.max_tokens = min(sampling.max_tokens, engine.max_context - len(ids))

    async def run(request: Request, jobs: list[Job]) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        for j in jobs:
            j.sink = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise APIError(
                429,
                f"server is busy ({e}); retry shortly",
                type="server_busy",
                code="queue_full",
                headers={"Retry-After": str(opts.retry_after_s)},
            ) from e
        return q

    async def collect(request: Request, jobs: list[Job], q: asyncio.Queue) -> tuple[list[str], list[str], int]:
        texts, reasons, left = [""] * len(jobs), [""] * len(jobs), len(jobs)
        try:
            while left:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if ev[0] == "text":
                    texts[ev[1]] += ev[2]
                else:
                    reasons[ev[1]] = ev[2]
                    left -= 1
        finally:
            for j in jobs:
                j.cancel()
        for r in reasons:
            if r.startswith("error"):
                raise APIError(500, r.removeprefix("error: "), type="server_error")
        return texts, reasons, sum(len(j.prompt_ids) for j in jobs)

    def usage(jobs: list[Job]) -> dict[str, int]:
        p, c = sum(len(j.prompt_ids) for j in jobs), sum(j.completion_tokens for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream(jobs: list[Job], q: asyncio.Queue, chunk: Callable[[int, str | None, str | None], dict],
               include_usage: bool, head: list[dict]) -> StreamingResponse:  # fmt: skip
        async def events() -> AsyncIterator[str]:
            try:
                for h in head:
                    yield _sse(h)
                left = len(jobs)
                while left:
                    ev = await q.get()
                    if ev[0] == "text":
                        yield _sse(chunk(ev[1], ev[2], None))
                    else:
                        left -= 1
                        reason = ev[2]
                        if reason.startswith("error"):
                            yield _sse(
                                {
                                    "error": {
                                        "message": reason.removeprefix("error: "),
                                        "type": "server_error",
                                        "param": None,
                                        "code": None,
                                    }
                                }
                            )
                            reason = "stop"
                        yield _sse(chunk(ev[1], None, reason))
                if include_usage:
                    yield _sse({**chunk(0, None, None), "choices": [], "usage": usage(jobs)})
                yield "data: [DONE]\n\n"
            finally:
                for j in jobs:  # a client that went away cancels its rows; no-op for finished ones
                    j.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        model = pick_model(body)
        sampling = _sampling(body, opts.default_max_tokens)
        messages, image = _chat_messages(body, opts.local_image_root)
        entry = engine.models[model]
        if image is not None and not entry.multimodal:
            raise APIError(
                400,
                f"model {model!r} is text-only and takes no image input; pick a multimodal adapter or drop the image",
                param="messages",
                code="image_not_supported",
            )
        ids = engine.encode(engine.render_chat(model, messages))
        check_prompt(ids, sampling)
        jobs = [Job(model, ids, sampling, image=image)]
        q = await run(request, jobs)
        cid, created = "chatcmpl-" + jobs[0].id, int(time.time())
        if body.get("stream"):

            def chunk(i: int, text: str | None, reason: str | None) -> dict:
                delta = {} if text is None else {"content": text}
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}],
                }

            first = chunk(0, "", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return stream(jobs, q, chunk, include, [first])
        texts, reasons, _ = await collect(request, jobs, q)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                         "logprobs": None, "finish_reason": reasons[0]}],
            "usage": usage(jobs),
        })  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request)
        model = pick_model(body)
        sampling = _sampling(body, 16)  # OpenAI's default for completions
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        if len(prompts) > engine.max_batch:
            raise APIError(400, f"at most {engine.max_batch} prompts per request", param="prompt")
        jobs = []
        for i, p in enumerate(prompts):
            ids = engine.encode(p)
            s = Sampling(**vars(sampling))
            check_prompt(ids, s)
            jobs.append(Job(model, ids, s, index=i))
        q = await run(request, jobs)
        cid, created = "cmpl-" + jobs[0].id, int(time.time())

        def chunk(i: int, text: str | None, reason: str | None) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}],
            }

        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return stream(jobs, q, chunk, include, [])
        texts, reasons, _ = await collect(request, jobs, q)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": usage(jobs),
        })  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": e.name, "object": "model", "created": 0, "owned_by": "llama-adapter",
             "adapter": e.adapter is not None, "multimodal": e.multimodal}
            for e in engine.models.values()
        ]}  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        running = engine._thread is not None and engine._thread.is_alive()
        return {"status": "ok" if running else "stopped", "models": list(engine.models), **engine.snapshot()}

    static = resources.files("llama_adapter") / "static"

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
        res = static / name
        if "/" in name or name.startswith(".") or not res.is_file() or Path(name).suffix not in types:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return Response(res.read_bytes(), media_type=types[Path(name).suffix])

    return app


def run(
    engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
    log_level: str = "info",
) -> None:  # fmt: skip
    """Serve until interrupted (uvicorn, one process: the engine thread owns the model)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and (options is None or options.api_key is None):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    uvicorn.run(build_app(engine, options), host=host, port=port, log_level=log_level, access_log=False)


def add_arguments(p: Any) -> None:
    """`llama-adapter serve` flags (argparse)."""
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (preset name or path)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load an adapter under a model name (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMA_ADAPTER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA_ADAPTER_API_KEY)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the loader puts it)")
    p.add_argument("--template", default="auto", help="chat template of the base model: auto, plain, chatml, alpaca")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: %(default)s)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache length per row (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts get 400")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models on busy machines)"
    )
    p.add_argument(
        "--allow-local-images",
        metavar="DIR",
        default=None,
        help="let image_url name image files under DIR (off by default)",
    )


def serve_main(args: Any) -> int:
    """Entry point for `llama-adapter serve` (args from `add_arguments`)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter alpaca=runs/alpaca")
        adapters[name] = path
    engine = load_engine(
        args.model, adapters, dtype=getattr(torch, args.dtype), device=args.device, template=args.template,
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
        max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    opts = ServeOptions(
        api_key=args.api_key, max_body_bytes=args.max_body_bytes, local_image_root=args.allow_local_images
    )
    log.info("serving %s on http://%s:%d/", ", ".join(engine.models), args.host, args.port)
    run(engine, host=args.host, port=args.port, options=opts)
    return 0
