"""Load test for `llama-adapter serve`: N streaming requests, at most C in flight, to localhost only.

    python benchmarks/load_test.py --spawn stories260k --requests 64 --concurrency 16
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model tiny --requests 32
    python benchmarks/load_test.py --spawn smollm2-135m-instruct --adapters 64 --requests 64 --concurrency 64 \
        --max-batch 64 --max-tokens 32 --ignore-eos --temperature 0     # 64 adapters vs one, same server

Prints a markdown table (stdout): p50/p95 latency and time to first token, generated tokens/s
(server-reported `usage`), the engine's mean batch size, and the error count (should be 0).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_CONCURRENCY = 256
MAX_REQUESTS = 10_000


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None
    tokens: int
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, args: argparse.Namespace, i: int) -> Result:
    body: dict = {
        "model": args.models[i % len(args.models)] if getattr(args, "models", None) else args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": i,
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", args.prompt
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Result(False, time.perf_counter() - t0, None, 0, f"HTTP {r.status_code}: {await r.aread()!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, time.perf_counter() - t0, ttft, tokens, chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                c = chunk["choices"][0] if chunk.get("choices") else None
                if ttft is None and c and (c.get("delta", {}).get("content") or c.get("text")):
                    ttft = time.perf_counter() - t0
            if not done:
                return Result(False, time.perf_counter() - t0, ttft, tokens, "stream ended without [DONE]")
    except httpx.HTTPError as e:
        return Result(False, time.perf_counter() - t0, ttft, tokens, f"{type(e).__name__}: {e}")
    return Result(True, time.perf_counter() - t0, ttft, tokens)


async def run_load(args: argparse.Namespace) -> tuple[list[Result], float, dict]:
    sem = asyncio.Semaphore(args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        before = (await client.get("/health")).json()
        done = 0

        async def bounded(i: int) -> Result:
            nonlocal done
            async with sem:
                res = await one(client, args, i)
            done += 1
            if done % max(1, args.requests // 10) == 0 or done == args.requests:
                print(f"  {done}/{args.requests} done", file=sys.stderr)
            return res

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
        after = (await client.get("/health")).json()
    steps = after.get("steps", 0) - before.get("steps", 0)
    rows = after.get("row_steps", 0) - before.get("row_steps", 0)
    server = {
        "steps": steps,
        "mean_batch": rows / steps if steps else float("nan"),
        "max_batch": after.get("max_batch"),
    }
    return list(results), wall, server


def report(args: argparse.Namespace, results: list[Result], wall: float, server: dict) -> str:
    ok = [r for r in results if r.ok]
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    errors = [r for r in results if not r.ok]
    rows = [
        ("model", args.model),
        ("requests / concurrency", f"{args.requests} / {args.concurrency}"),
        ("max_tokens", f"{args.max_tokens}{' (ignore_eos)' if args.ignore_eos else ''}"),
        ("latency p50 / p95 (s)", f"{percentile(lat, 0.5):.3f} / {percentile(lat, 0.95):.3f}"),
        ("time to first token p50 / p95 (s)", f"{percentile(ttft, 0.5):.3f} / {percentile(ttft, 0.95):.3f}"),
        ("generated tokens", str(tokens)),
        ("throughput (tokens/s)", f"{tokens / wall:.1f}"),
        ("requests/s", f"{len(ok) / wall:.2f}"),
        ("mean tokens per request", f"{statistics.mean([r.tokens for r in ok]):.1f}" if ok else "-"),
        ("server mean batch (max)", f"{server['mean_batch']:.2f} ({server['max_batch']})"),
        ("wall time (s)", f"{wall:.2f}"),
        ("errors", str(len(errors))),
    ]
    out = ["| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]]
    for r in errors[:5]:
        out.append(f"\nerror: {r.error}")
    return "\n".join(out)


def random_adapters(spec: str, n: int, out: str) -> dict[str, str]:
    """n random K=10, L=30 adapters (open gates) for `spec`, saved under `out`: {name: dir}."""
    import torch

    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, save_adapter
    from llama_adapter.checkpoint import load_model

    base = load_model(spec, progress=False)
    dirs = {}
    for i in range(n):
        torch.manual_seed(i)
        ad = AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=min(30, base.config.n_layers)))
        with torch.no_grad():
            ad.adapter.prompts.mul_(0.02)
            ad.adapter.gates.uniform_(0.0, 0.5)
        dirs[f"a{i}"] = save_adapter(ad, f"{out}/a{i}", metadata={"template": "plain"}).as_posix()
        ad.detach_base()
    return dirs


def spawn(args: argparse.Namespace):
    """Start `llama-adapter serve` in this process on a free 127.0.0.1 port."""
    import tempfile

    import torch
    import uvicorn

    from llama_adapter.loading import load_stack
    from llama_adapter.serve import Scheduler, ServeOptions, build_app

    torch.set_num_threads(args.threads)
    adapters = random_adapters(args.spawn, args.adapters, tempfile.mkdtemp()) if args.adapters else None
    stack = load_stack(args.spawn, adapters, weights=args.weights)
    engine = Scheduler(stack, max_batch=args.max_batch, max_queue=max(64, args.concurrency))
    args.model = args.model or engine.base_name
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine, ServeOptions()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    args.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return server, thread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="server to test (localhost only), e.g. http://127.0.0.1:8000")
    p.add_argument("--spawn", metavar="MODEL", help="start a server for MODEL in this process instead")
    p.add_argument("--max-batch", type=int, default=8, help="engine batch size with --spawn")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads with --spawn")
    p.add_argument("--weights", default="auto", help="--weights of the spawned server (default: %(default)s)")
    p.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="with --spawn: load N random adapters and run the load twice, every request on its own adapter "
        "(round robin) and every request on the first one; reports both and their ratio",
    )
    p.add_argument("--model", default=None, help="model/adapter name to request (default: the base)")
    p.add_argument("--requests", "-n", type=int, default=32)
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens (fixed work per request)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if not 1 <= args.concurrency <= MAX_CONCURRENCY or not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--concurrency must be 1..{MAX_CONCURRENCY} and --requests 1..{MAX_REQUESTS}")
    if (args.url is None) == (args.spawn is None):
        p.error("give exactly one of --url or --spawn")
    server = None
    if args.spawn:
        server, thread = spawn(args)
    host = urlparse(args.url).hostname
    if host not in LOCAL_HOSTS:
        p.error(f"--url host {host!r}: this script only sends traffic to localhost ({', '.join(sorted(LOCAL_HOSTS))})")
    if args.model is None:
        args.model = httpx.get(args.url + "/health", timeout=10).json()["models"][0]
    print(f"load test: {args.requests} requests, {args.concurrency} concurrent, against {args.url}", file=sys.stderr)
    try:
        if args.adapters:
            names = [f"a{i}" for i in range(args.adapters)]
            args.models = names
            asyncio.run(run_load(args))  # warm-up
            mixed = asyncio.run(run_load(args))
            args.models = names[:1]
            single = asyncio.run(run_load(args))
        else:
            results, wall, srv = asyncio.run(run_load(args))
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(10)
    if args.adapters:
        rate = [sum(r.tokens for r in res if r.ok) / wall for res, wall, _ in (mixed, single)]
        print(f"## Serving: {args.adapters} adapters in one batch vs one adapter\n")
        print(f"`python benchmarks/load_test.py {' '.join(sys.argv[1:])}`\n")
        print("| requests | tokens/s | mean batch |\n|---|---:|---:|")
        for label, (_, _, srv), r in zip((f"each on its own adapter (of {args.adapters})", "all on one adapter"),
                                              (mixed, single), rate):  # fmt: skip
            print(f"| {label} | {r:.1f} | {srv['mean_batch']:.1f} |")
        print(f"\nmixed / single: {rate[0] / rate[1]:.3f}")
        results = mixed[0] + single[0]
    else:
        print(report(args, results, wall, srv))
    return 1 if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
