"""The HTTP layer (FastAPI): `/v1/chat/completions`, `/v1/completions` (both with `stream: true`
as server-sent events), `/v1/models`, `/health` and the web chat page at `/`.

Handlers only translate: a request body becomes `Job`s for the scheduler (api.py checks it), the
scheduler's events become JSON or SSE chunks. Tokenisation runs off the event loop, after a
cheap character bound, so one huge prompt cannot stall other clients.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .api import APIError, ServeOptions, parse_messages, parse_sampling, sse
from .scheduler import Job, QueueFull, Sampling, Scheduler

log = logging.getLogger("llama_adapter.serve")

# No tokenizer here makes a token of more than this many characters, so a longer text is over the
# token limit for sure and is refused before any tokenising.
MAX_CHARS_PER_TOKEN = 64
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


def build_app(scheduler: Scheduler, options: ServeOptions | None = None, *, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. With `manage_engine` the app starts and stops the scheduler's thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            scheduler.start()
        try:
            yield
        finally:
            if manage_engine:
                scheduler.stop()

    app = FastAPI(title="llama-adapter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.opts = options or ServeOptions()
    app.add_exception_handler(APIError, _api_error)
    app.middleware("http")(_access_log)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/static/{name}", static_file, methods=["GET"])
    return app


# -- plumbing ------------------------------------------------------------------------------------


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _access_log(request: Request, call_next: Callable) -> Response:
    t0, rid = time.perf_counter(), uuid.uuid4().hex[:12]
    request.state.rid = rid
    opts: ServeOptions = request.app.state.opts
    try:
        if request.url.path.startswith("/v1/") and opts.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), opts.api_key.encode()):
                raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        response = await call_next(request)
    except APIError as e:
        response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    response.headers["x-request-id"] = rid
    ms = 1000 * (time.perf_counter() - t0)
    log.info("%s %s %s %d %.1fms", rid, request.method, request.url.path, response.status_code, ms)
    return response


async def _read_json(request: Request) -> dict:
    limit = request.app.state.opts.max_body_bytes
    too_large = APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _pick_model(s: Scheduler, body: dict) -> str:
    name = body.get("model")
    if name is None or name == "":
        return s.base_name
    if not isinstance(name, str) or name not in s.models:
        raise APIError(404, f"model {name!r} does not exist; available: {', '.join(s.models)}", param="model",
                       code="model_not_found")  # fmt: skip
    return name


async def _encode(s: Scheduler, text: str, param: str) -> list[int]:
    """Token ids of `text` (on a worker thread), refusing texts over the prompt limit."""

    def too_long(n: str) -> APIError:
        return APIError(400, f"prompt is {n}; this server accepts at most {s.max_prompt_tokens} tokens",
                        param=param, code="context_length_exceeded")  # fmt: skip

    if len(text) > s.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
        raise too_long(f"{len(text)} characters")
    ids = await asyncio.to_thread(s.encode, text)
    if len(ids) > s.max_prompt_tokens:
        raise too_long(f"{len(ids)} tokens")
    return ids


def _fit(s: Scheduler, ids: list[int], sampling: Sampling) -> Sampling:
    sampling.max_tokens = min(sampling.max_tokens, s.max_context - len(ids))
    return sampling


def _submit(request: Request, jobs: list[Job]) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        j.sink = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)
    try:
        request.app.state.scheduler.submit(jobs)
    except QueueFull as e:
        retry = str(request.app.state.opts.retry_after_s)
        raise APIError(429, f"server is busy ({e}); retry shortly", type="server_busy", code="queue_full",
                       headers={"Retry-After": retry}) from e  # fmt: skip
    return q


async def _collect(request: Request, jobs: list[Job], q: asyncio.Queue) -> tuple[list[str], list[str]]:
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
    return texts, reasons


def _usage(jobs: list[Job]) -> dict[str, int]:
    p, c = sum(len(j.prompt_ids) for j in jobs), sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _stream(jobs: list[Job], q: asyncio.Queue, chunk: Callable[[int, str | None, str | None], dict],
            include_usage: bool, head: list[dict]) -> StreamingResponse:  # fmt: skip
    async def events() -> AsyncIterator[str]:
        try:
            for h in head:
                yield sse(h)
            left = len(jobs)
            while left:
                ev = await q.get()
                if ev[0] == "text":
                    yield sse(chunk(ev[1], ev[2], None))
                    continue
                left -= 1
                reason = ev[2]
                if reason.startswith("error"):
                    err = {"message": reason.removeprefix("error: "), "type": "server_error", "param": None}
                    yield sse({"error": {**err, "code": None}})
                    reason = "stop"
                yield sse(chunk(ev[1], None, reason))
            if include_usage:
                yield sse({**chunk(0, None, None), "choices": [], "usage": _usage(jobs)})
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:  # a client that went away cancels its rows; no-op for finished ones
                j.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


# -- routes --------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    s: Scheduler = request.app.state.scheduler
    opts: ServeOptions = request.app.state.opts
    body = await _read_json(request)
    model = _pick_model(s, body)
    sampling = parse_sampling(body, opts.default_max_tokens)
    messages, image = parse_messages(body, opts.local_image_root)
    if image is not None and not s.multimodal(model):
        raise APIError(400, f"model {model!r} is text-only and takes no image input; pick a multimodal adapter "
                       "or drop the image", param="messages", code="image_not_supported")  # fmt: skip
    ids = await _encode(s, s.render_chat(model, messages), "messages")
    jobs = [Job(model, ids, _fit(s, ids, sampling), image=image)]
    q = _submit(request, jobs)
    cid, created = "chatcmpl-" + jobs[0].id, int(time.time())

    def chunk(i: int, text: str | None, reason: str | None) -> dict:
        delta = {} if text is None else {"content": text}
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

    if body.get("stream"):
        first = chunk(0, "", None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return _stream(jobs, q, chunk, _include_usage(body), [first])
    texts, reasons = await _collect(request, jobs, q)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                     "logprobs": None, "finish_reason": reasons[0]}],
        "usage": _usage(jobs),
    })  # fmt: skip


async def completions(request: Request) -> Response:
    s: Scheduler = request.app.state.scheduler
    body = await _read_json(request)
    model = _pick_model(s, body)
    sampling = parse_sampling(body, 16)  # OpenAI's default for completions
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
    if len(prompts) > s.max_batch:
        raise APIError(400, f"at most {s.max_batch} prompts per request", param="prompt")
    jobs = []
    for i, p in enumerate(prompts):
        ids = await _encode(s, p, "prompt")
        jobs.append(Job(model, ids, _fit(s, ids, Sampling(**vars(sampling))), index=i))
    q = _submit(request, jobs)
    cid, created = "cmpl-" + jobs[0].id, int(time.time())

    def chunk(i: int, text: str | None, reason: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}]}  # fmt: skip

    if body.get("stream"):
        return _stream(jobs, q, chunk, _include_usage(body), [])
    texts, reasons = await _collect(request, jobs, q)
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                    for i, (t, r) in enumerate(zip(texts, reasons))],
        "usage": _usage(jobs),
    })  # fmt: skip


async def list_models(request: Request) -> dict:
    s: Scheduler = request.app.state.scheduler
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "llama-adapter",
         "adapter": m != s.base_name, "multimodal": s.multimodal(m)}
        for m in s.models
    ]}  # fmt: skip


async def health(request: Request) -> dict:
    s: Scheduler = request.app.state.scheduler
    return {"status": "ok" if s.alive else "stopped", "models": s.models, **s.snapshot()}


def _static() -> Any:
    return resources.files("llama_adapter") / "static"


async def index() -> HTMLResponse:
    return HTMLResponse((_static() / "index.html").read_text(encoding="utf-8"))


async def static_file(name: str) -> Response:
    res = _static() / name
    if "/" in name or name.startswith(".") or not res.is_file() or Path(name).suffix not in STATIC_TYPES:
        raise APIError(404, f"no static file {name!r}", code="not_found")
    return Response(res.read_bytes(), media_type=STATIC_TYPES[Path(name).suffix])
