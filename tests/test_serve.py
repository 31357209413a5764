"""The HTTP server: OpenAI-format API (TestClient and the official client against real uvicorn),
continuous batching in the engine, limits, errors and cancellation."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import LiveServer, serve_engine, wait_for  # noqa: E402

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig  # noqa: E402
from llama_adapter.serve import Job, Sampling, Scheduler, ServeOptions, build_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    e = serve_engine()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine)) as c:
        yield c


def png_data_url(color=(200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- engine -----------------------------------------------------------------------------------


def reference_greedy(model, ids, n, ctx=None):
    """Greedy decoding by full recomputation, no cache, no batching: the ground truth."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]), ctx=ctx)[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def run_jobs(engine, jobs, timeout=60):
    events = []
    lock = threading.Lock()
    for j in jobs:
        j.sink = lambda ev, lock=lock: (lock.acquire(), events.append(ev), lock.release())
    engine.submit(jobs)
    for j in jobs:
        assert j.done.wait(timeout), "job did not finish"
    return events


def test_continuous_batching_matches_unbatched_greedy(engine):
    """Rows of different lengths and adapters, arriving while others decode, produce exactly the
    tokens of one-at-a-time greedy decoding (per-row positions, per-row prompts, slot reuse)."""
    engine.start()
    model, tok = engine.model, engine.tokenizer
    greedy = dict(temperature=0, ignore_eos=True)
    specs = [("Once upon a time", "stories260k", 12), ("Lily", "tiny", 30), ("The big dog ran to the park and",
             "stories260k", 7), ("Tom had a red ball", "tiny", 20)]  # fmt: skip
    jobs = [Job(n, tok.encode(p, bos=True), Sampling(max_tokens=m, **greedy), index=i)
            for i, (p, n, m) in enumerate(specs)]  # fmt: skip
    steps0 = engine.snapshot()["steps"]
    run_jobs(engine, jobs[:2])
    run_jobs(engine, jobs[2:])  # then a second wave joins a fresh batch
    # a staggered wave: one long row running, another joins while it decodes
    long = Job("tiny", tok.encode("Lily", bos=True), Sampling(max_tokens=40, **greedy), index=4)
    engine.submit([long])
    wait_for(lambda: len(long.tokens) > 3, what="row 4 to start")
    late = Job("stories260k", tok.encode("Once upon a time", bos=True), Sampling(max_tokens=12, **greedy), index=5)
    run_jobs(engine, [late])
    assert long.done.wait(30)
    assert engine.snapshot()["steps"] > steps0
    tiny_ctx = engine.stack.adapters["tiny"].model.prompt_state()
    for job in [*jobs, long, late]:
        ctx = tiny_ctx if job.model == "tiny" else None
        want = reference_greedy(model, job.prompt_ids, job.sampling.max_tokens, ctx)
        assert job.tokens == want, f"row {job.index} ({job.model}) differs from unbatched greedy"
    # the adapter changes the continuation (its gates are non-zero), so rows really used their own prompts
    assert reference_greedy(model, tok.encode("Lily", bos=True), 30) != jobs[1].tokens
    assert engine.snapshot()["active"] == 0


def test_rows_join_and_leave_a_short_cache():
    """Two slots, a short context and five rows that join and leave while others decode: every row
    is still exact (each row keeps its own cache positions; freed slots are reused)."""
    e = serve_engine(adapters=False, max_batch=2, max_context=64).start()
    try:
        tok = e.tokenizer
        greedy = dict(temperature=0, ignore_eos=True)
        a = Job("stories260k", tok.encode("Once upon a time", bos=True), Sampling(max_tokens=50, **greedy), index=0)
        e.submit([a])
        wait_for(lambda: len(a.tokens) >= 30, what="row 0 to get going")
        more = [("Lily", 45), ("Tom", 9), ("The cat", 20), ("Once", 5)]
        rest = [Job("stories260k", tok.encode(p, bos=True), Sampling(max_tokens=n, **greedy), index=i)
                for i, (p, n) in enumerate(more, start=1)]  # fmt: skip
        e.submit(rest)
        for job in [a, *rest]:
            assert job.done.wait(30)
            want = reference_greedy(e.model, job.prompt_ids, job.sampling.max_tokens)
            assert job.tokens == want, f"row {job.index} differs"
        assert e.snapshot()["active"] == 0
    finally:
        e.stop()


def test_seed_makes_sampling_reproducible(engine):
    engine.start()
    tok = engine.tokenizer

    def sample(seed):
        texts = []
        job = Job("stories260k", tok.encode("Once", bos=True), Sampling(max_tokens=20, temperature=1.0, seed=seed))
        job.sink = lambda ev: texts.append(ev[2]) if ev[0] == "text" else None
        engine.submit([job])
        assert job.done.wait(30)
        return "".join(texts)

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


# --- HTTP API (TestClient) ----------------------------------------------------------------------


def test_models_health_and_page(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    ids = {m["id"]: m for m in r.json()["data"]}
    assert set(ids) == {"stories260k", "tiny", "vis"}
    assert ids["vis"]["multimodal"] and not ids["tiny"]["multimodal"]
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["stories260k", "tiny", "vis"]
    page = client.get("/")
    assert page.status_code == 200 and '<select id="model"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404


def test_chat_completion_and_usage(client, engine, caplog):
    caplog.set_level(logging.INFO, logger="llama_adapter.serve")
    body = {"model": "stories260k", "messages": [{"role": "user", "content": "Once upon a time"}],
            "max_tokens": 10, "temperature": 0}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["model"] == "stories260k"
    msg = d["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    n_prompt = len(engine.encode(engine.render_chat("stories260k", body["messages"])))
    assert d["usage"]["prompt_tokens"] == n_prompt
    assert 1 <= d["usage"]["completion_tokens"] <= 10
    assert d["usage"]["total_tokens"] == n_prompt + d["usage"]["completion_tokens"]
    assert r.headers["x-request-id"]
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("POST /v1/chat/completions 200" in m for m in logged), logged
    assert any("completion_tokens=" in m and "model=stories260k" in m for m in logged), logged
    # greedy is deterministic, and the adapter changes the answer
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"] == msg
    other = client.post("/v1/chat/completions", json={**body, "model": "tiny", "max_tokens": 30}).json()
    assert other["choices"][0]["message"]["content"] != msg["content"]


def test_completion_stop_and_length(client):
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    text = full["text"]
    assert full["finish_reason"] in ("length", "stop")
    word = text.split()[3]
    cut = client.post("/v1/completions", json={**body, "stop": [word]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(word)]
    short = client.post("/v1/completions", json={**body, "max_tokens": 3}).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    two = client.post("/v1/completions", json={**body, "prompt": ["Once upon a time", "Lily"], "max_tokens": 5})
    assert [c["index"] for c in two.json()["choices"]] == [0, 1]


def test_streaming_sse(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Lily"}], "max_tokens": 16, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    ev = sse_events(raw)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and chunks[-1]["usage"]["completion_tokens"] >= 1
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == text
    with client.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 5, "stream": True}) as r:
        ev = sse_events("".join(r.iter_text()))
    assert ev[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in ev[:-1])


def test_errors_are_openai_shaped(client, engine):
    def err(r, status):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        return e

    msgs = [{"role": "user", "content": "hi"}]
    e = err(client.post("/v1/chat/completions", json={"model": "nope", "messages": msgs}), 404)
    assert e["code"] == "model_not_found" and "stories260k" in e["message"]
    err(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    e = err(
        client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert e["code"] == "invalid_json"
    err(client.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    e = err(client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": -5}), 400)
    assert e["param"] == "max_tokens"
    err(client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 0}), 400)
    err(client.post("/v1/chat/completions", json={"messages": msgs, "temperature": "hot"}), 400)
    err(client.post("/v1/chat/completions", json={"messages": msgs, "top_p": 1.5}), 400)
    err(client.post("/v1/chat/completions", json={"messages": []}), 400)
    err(client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    err(client.post("/v1/completions", json={"prompt": 5}), 400)
    long = "Once upon a time " * 200
    e = err(client.post("/v1/completions", json={"prompt": long}), 400)
    assert e["code"] == "context_length_exceeded"
    e = err(client.post("/v1/completions", content=b"x" * (9 << 20)), 413)
    assert e["code"] == "body_too_large"
    assert client.get("/health").json()["active"] == 0


def test_body_limit_without_content_length(engine):
    app = build_app(engine, ServeOptions(max_body_bytes=1000), manage_engine=False)
    engine.start()
    with TestClient(app) as c:
        chunks = (b"x" * 300 for _ in range(10))  # chunked: no Content-Length header
        r = c.post("/v1/completions", content=chunks)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        ok = c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
        assert ok.status_code == 200


def test_api_key(engine):
    engine.start()
    with TestClient(build_app(engine, ServeOptions(api_key="s3cret"), manage_engine=False)) as c:
        body = {"prompt": "Once", "max_tokens": 2}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_images(client, tmp_path):
    url = png_data_url()
    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**body, "model": "vis"})
    assert r.status_code == 200, r.text
    with_red = r.json()["choices"][0]["message"]["content"]
    for model in ("tiny", "stories260k"):
        r = client.post("/v1/chat/completions", json={**body, "model": model})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_supported"
    # the image reaches the prompts: without it the same greedy decoding says something else
    no_image = {**body, "model": "vis", "messages": [{"role": "user", "content": content[:1]}]}
    assert client.post("/v1/chat/completions", json=no_image).json()["choices"][0]["message"]["content"] != with_red
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}
    r = client.post(
        "/v1/chat/completions", json={**body, "model": "vis", "messages": [{"role": "user", "content": [bad]}]}
    )
    assert r.status_code == 400
    path_part = {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}
    r = client.post(
        "/v1/chat/completions", json={**body, "model": "vis", "messages": [{"role": "user", "content": [path_part]}]}
    )
    assert r.status_code == 400 and "--allow-local-images" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={**body, "model": "vis", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})  # fmt: skip
    assert r.status_code == 400


def test_local_image_paths_need_the_flag(engine, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "a.png")
    engine.start()
    app = build_app(engine, ServeOptions(local_image_root=str(tmp_path)), manage_engine=False)
    with TestClient(app) as c:

        def ask(url):
            part = {"type": "image_url", "image_url": {"url": url}}
            return c.post("/v1/chat/completions", json={"model": "vis", "max_tokens": 3,
                                                        "messages": [{"role": "user", "content": [part]}]})  # fmt: skip

        assert ask(str(tmp_path / "a.png")).status_code == 200
        assert ask("a.png").status_code == 200
        assert ask("../" + tmp_path.name + "/../a.png").status_code == 400
        assert ask("/etc/passwd").status_code == 400


def test_queue_full_gives_429_with_retry_after():
    e = serve_engine(adapters=False, max_batch=1, max_queue=1, step_delay=0.005).start()
    try:
        tok = e.tokenizer
        hog = Job("stories260k", tok.encode("Once", bos=True), Sampling(max_tokens=400, temperature=0, ignore_eos=True))
        e.submit([hog])
        wait_for(lambda: e.snapshot()["active"] == 1, what="the first job to run")
        waiting = Job("stories260k", tok.encode("Once", bos=True), Sampling(max_tokens=2))
        e.submit([waiting])
        with TestClient(build_app(e, manage_engine=False)) as c:
            r = c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        hog.cancel()
        assert waiting.done.wait(30) and waiting.finish_reason == "length"
        assert hog.finish_reason == "cancelled" and hog.completion_tokens < 400
    finally:
        e.stop()


def test_adapters_with_different_lengths_share_steps():
    """Adapters with different prompt lengths K (and the frozen base) decode in the same steps: the
    shorter prompt blocks are padded and masked, and every row equals its row decoded alone."""
    from helpers import serve_stack

    from llama_adapter.loading import LoadedAdapter

    stack = serve_stack(adapters=False)
    model, tok = stack.model, stack.tokenizer
    torch.manual_seed(1)
    for name, k, layers in (("a", 4, 4), ("b", 2, 5)):
        ad = AdaptedLLaMA(model, AdapterConfig(adapter_len=k, adapter_layers=layers))
        with torch.no_grad():
            ad.adapter.gates.uniform_(1.0, 2.0)
        stack.adapters[name] = LoadedAdapter(name, ad.eval(), {}, "plain", "")
    e = Scheduler(stack, max_batch=4).start()
    try:
        jobs = [Job(n, tok.encode("Once", bos=True), Sampling(max_tokens=10, temperature=0, ignore_eos=True), index=i)
                for i, n in enumerate(["a", "b", "stories260k", "a"])]  # fmt: skip
        run_jobs(e, jobs)
        assert all(j.finish_reason == "length" and j.completion_tokens == 10 for j in jobs)
        assert e.snapshot()["steps"] <= 10  # one shared batch, not one adapter after the other
        for j in jobs:
            ctx = None if j.model == "stories260k" else stack.adapters[j.model].model.prompt_state()
            assert j.tokens == reference_greedy(model, j.prompt_ids, 10, ctx), j.model
        assert len({tuple(j.tokens) for j in jobs}) == 3  # a, b and the base each say something else
    finally:
        e.stop()


# --- real server: disconnects and the official client ---------------------------------------------


@pytest.fixture(scope="module")
def live():
    e = serve_engine(step_delay=0.01)
    with LiveServer(build_app(e)) as s:
        s.engine = e
        yield s


def test_client_disconnect_cancels_generation(live):
    e = live.engine
    before = e.snapshot()["cancelled"]
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            assert e.snapshot()["active"] == 1
        # leaving the block closes the connection mid-stream
    wait_for(lambda: e.snapshot()["cancelled"] == before + 1 and e.snapshot()["active"] == 0,
             what="the engine to cancel the row")  # fmt: skip
    assert not e.engine.rows  # the slot is free, nothing left behind
    # the server still works
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3}).status_code == 200


def test_openai_client(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"stories260k", "tiny", "vis"}
    msgs = [{"role": "user", "content": "Once upon a time"}]
    r = client.chat.completions.create(model="stories260k", messages=msgs, max_tokens=12, temperature=0, seed=1)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    parts = []
    stream = client.chat.completions.create(model="stories260k", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True)  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert len(parts) > 1 and "".join(parts) == r.choices[0].message.content
    c = client.completions.create(model="tiny", prompt="Lily", max_tokens=5, temperature=0, stop=["\n"])
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=msgs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="stories260k", messages=msgs, max_tokens=-1)


def test_health_answers_while_the_largest_prompt_is_tokenised(live):
    """Tokenising runs off the event loop: /health answers within 100 ms while the largest prompt
    the server accepts (by its character bound) is being tokenised, and a 7 MB message (under the
    body limit) is refused at once, before any tokenising."""
    import concurrent.futures

    from llama_adapter.serve.http import MAX_CHARS_PER_TOKEN

    e = live.engine
    biggest = "Once upon a time " * (e.max_prompt_tokens * MAX_CHARS_PER_TOKEN // 17)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        t = time.perf_counter()
        r = c.post("/v1/completions", json={"prompt": "x" * (7 << 20), "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - t < 5

        def big():
            return c.post("/v1/completions", json={"prompt": biggest, "max_tokens": 1})

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(big)
            time.sleep(0.05)  # the request is in: its body is read, its text being tokenised
            worst = 0.0
            while not fut.done():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                worst = max(worst, time.perf_counter() - t)
            assert fut.result().status_code == 400  # far over the token limit, found by tokenising
    assert worst < 0.1, f"/health took {worst * 1000:.0f} ms while a prompt was tokenised"


def test_hundred_disconnects_leave_no_rows_and_no_growing_memory(live):
    import resource

    e = live.engine
    body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}

    def abandon(n):
        for _ in range(n):
            with httpx.Client(base_url=live.url, timeout=30) as c:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            break  # the first token arrived: hang up mid-stream

    abandon(20)  # warm up allocators and caches
    wait_for(lambda: e.snapshot()["active"] == 0, what="rows to be freed")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cancelled0 = e.snapshot()["cancelled"]
    abandon(100)
    wait_for(lambda: e.snapshot()["active"] == 0 and e.snapshot()["queued"] == 0, what="rows to be freed")
    assert e.snapshot()["cancelled"] - cancelled0 >= 95  # a few may finish before the hang-up lands
    assert not e.engine.rows
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 50, f"peak RSS grew {grown_mb:.0f} MB over 100 abandoned requests"
