"""`llama-adapter serve`: flags, loading and uvicorn."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..loading import WEIGHTS, WEIGHTS_HELP, load_stack
from .api import ServeOptions
from .http import build_app
from .scheduler import Scheduler

log = logging.getLogger("llama_adapter.serve")


def run(
    scheduler: Scheduler, *, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
    log_level: str = "info",
) -> None:  # fmt: skip
    """Serve until interrupted (uvicorn, one process: the engine thread owns the model)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and (options is None or options.api_key is None):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    uvicorn.run(build_app(scheduler, options), host=host, port=port, log_level=log_level, access_log=False)


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
    p.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help=WEIGHTS_HELP,
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the loader puts it)")
    p.add_argument("--tokenizer", help="tokenizer file when none lies next to the weights")
    p.add_argument("--template", default="auto", help="chat template of the base model: auto, plain, chatml, alpaca")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default: %(default)s)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (1.7x faster decoding on packed weights here, after a warm-up of minutes)",
    )
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
        if name in adapters:
            raise ValueError(f"--adapter name {name!r} is used twice; give each adapter its own name")
        adapters[name] = path
    stack = load_stack(args.model, adapters, dtype=args.dtype, device=args.device, template=args.template,
                       tokenizer=args.tokenizer, weights=args.weights)  # fmt: skip
    if stack.name in adapters:
        raise ValueError(f"--adapter name {stack.name!r} equals the base model's name; pick another name")
    scheduler = Scheduler(stack, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                          max_prompt_tokens=args.max_prompt_tokens, compile=args.compile)  # fmt: skip
    opts = ServeOptions(
        api_key=args.api_key, max_body_bytes=args.max_body_bytes, local_image_root=args.allow_local_images
    )
    log.info("serving %s on http://%s:%d/", ", ".join(scheduler.models), args.host, args.port)
    run(scheduler, host=args.host, port=args.port, options=opts)
    return 0
