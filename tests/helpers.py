"""What several test files share: paths to ../shared, one tiny-model factory, a live server.

Test files import from here (`from helpers import tiny_llama`), never from each other; pytest
fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from llama_adapter.config import Config
from llama_adapter.model import LLaMA

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2C = SHARED / "llama2c"
STORIES = LLAMA2C / "stories260K.bin"
TOK512 = LLAMA2C / "tok512.bin"
ALPACA = SHARED / "alpaca" / "alpaca_en_demo.json"
FLICKR = SHARED / "flickr8k_1k"


def tiny_llama(
    seed: int = 0,
    *,
    n_layers: int = 3,
    n_kv_heads: int = 2,
    std: float = 0.02,
    frozen: bool = False,
    **overrides: Any,
) -> LLaMA:
    """A random tiny LLaMA in eval mode: dim 32, 4 heads (GQA with 2 KV heads by default), a 61-token
    vocabulary and a 64-token context unless `overrides` say otherwise (any `Config` field)."""
    torch.manual_seed(seed)
    fields = dict(name="tiny", dim=32, n_heads=4, vocab_size=61, hidden_dim=48, max_seq_len=64, norm_eps=1e-5)
    c = Config(**{**fields, "n_layers": n_layers, "n_kv_heads": n_kv_heads, **overrides})
    m = LLaMA(c)
    m.reset_parameters(std=std)
    if frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return m.eval()


def stories260k() -> tuple[LLaMA, Any]:
    """The real stories260K model (eval mode) and its tokenizer."""
    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    model = load_model("stories260k")
    return model.eval(), load_tokenizer(model.config.extra["tokenizer"])


def serve_stack(adapters: bool = True) -> Any:
    """stories260k plus two adapters with non-zero gates: 'tiny' (text) and 'vis' (multimodal,
    the random clip-tiny encoder), so adapters visibly change what the model says."""
    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
    from llama_adapter.loading import LoadedAdapter, Stack

    model, tok = stories260k()
    stack = Stack(model, tok, "plain", "stories260k")
    if adapters:
        torch.manual_seed(0)
        tiny = AdaptedLLaMA(model, AdapterConfig(adapter_len=4, adapter_layers=2))
        vis = AdaptedLLaMA(
            model, AdapterConfig(adapter_len=4, adapter_layers=3, visual_dim=128, image_encoder="clip-tiny")
        )
        with torch.no_grad():
            for a in (tiny, vis):
                a.adapter.gates.uniform_(0.5, 1.0)
            vis.adapter_visual.fc2.weight.mul_(20.0)  # make the (random) image features matter
        for name, a in (("tiny", tiny), ("vis", vis)):
            stack.adapters[name] = LoadedAdapter(name, a.eval(), {}, "plain", "")
    return stack


def serve_engine(adapters: bool = True, **kw: Any) -> Any:
    """A `serve.Scheduler` over `serve_stack` (not started)."""
    from llama_adapter.serve import Scheduler

    kw.setdefault("max_batch", 4)
    return Scheduler(serve_stack(adapters), **kw)


def wait_for(cond: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class LiveServer:
    """uvicorn on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class Hang(BaseException):
    """Raised when a reader runs past its time limit (not an Exception, so no reader catches it)."""


def _check_copies(path: Path, variants: list[bytes], load: Any, limit_s: float) -> dict[str, int]:
    """Write each variant to `path` and call `load()`: it must succeed or raise a ValueError/OSError with
    a one-line message, within `limit_s` seconds. The file is restored afterwards."""
    import signal
    import traceback

    def on_alarm(*_: Any) -> None:
        raise Hang(f"{path.name}: the reader took more than {limit_s} s")

    original = path.read_bytes()
    counts = {"loaded": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for data in variants:
            path.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, limit_s)
            try:
                load()
                counts["loaded"] += 1
            except (ValueError, OSError) as e:
                assert str(e).strip() and "\n" not in str(e), f"{type(e).__name__} not one line: {e!r}"
                counts["refused"] += 1
            except Exception as e:
                where = "".join(traceback.format_exception(e)[-6:])
                shown = data[:300] if len(data) < 2000 else f"{len(data)} of {len(original)} bytes"
                raise AssertionError(f"{path.name} ({shown!r}): {type(e).__name__}: {e}\n{where}") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        path.write_bytes(original)
    return counts


def fuzz_file(
    path: Path, load: Any, *, cuts: int = 16, flips: int = 16, seed: int = 0, head: int = 64, limit_s: float = 20.0
) -> dict[str, int]:
    """`path` truncated at `cuts` offsets and `flips` copies with 1-4 random bytes changed (half of them
    within the first `head` bytes, where the headers are): `load()` must load each copy or refuse it with
    a one-line ValueError/OSError in bounded time. Returns how many copies loaded and were refused."""
    import random

    original = path.read_bytes()
    rng = random.Random(seed)
    n = len(original)
    offsets = {0, 1, 4, n - 1, *(rng.randrange(n) for _ in range(cuts - 4))} if cuts else set()
    variants = [original[:k] for k in sorted(offsets)] if cuts or flips else [original]
    for i in range(flips):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(min(head, n) if i % 2 else n)
            data[j] = rng.randrange(256)
        variants.append(bytes(data))
    return _check_copies(path, variants, load, limit_s)


def fuzz_json(path: Path, load: Any, limit_s: float = 20.0) -> dict[str, int]:
    """Like `fuzz_file` for a JSON object file, damaged by meaning rather than bytes: the whole file
    replaced by other JSON values, and each top-level key removed or set to a value of another type or
    an absurd size."""
    import json

    d = json.loads(path.read_text(encoding="utf-8"))
    odd: list[Any] = [None, "x", -1, 0, 10**12, 1.5, [1, 2], {"a": 1}, True]
    variants = [json.dumps(v) for v in ([1, 2], "text", 3, None)]
    for key in d:
        variants.append(json.dumps({k: v for k, v in d.items() if k != key}))
        variants += [json.dumps({**d, key: v}) for v in odd]
    return _check_copies(path, [v.encode() for v in variants], load, limit_s)


HOOKS = Path(__file__).resolve().parent / "hooks"


def fault_env(**env: str) -> dict[str, str]:
    """Environment for a child process that loads tests/hooks/sitecustomize.py (fault injection:
    LLAMA_ADAPTER_TEST_CRASH_RANK=..., LLAMA_ADAPTER_TEST_KILL_AT=...; see that file)."""
    path = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **env}


STORY_NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Amy"]


def story_data(folder: Path, n: int = 24) -> Path:
    """folder/data.json: `n` Alpaca examples, "Tell a story about Lily." -> "Lily went to the park..."."""
    rows = [
        {"instruction": f"Tell a story about {name}.", "input": "", "output": f"{name} went to the park and was happy."}
        for name in STORY_NAMES * (n // len(STORY_NAMES))
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


def tiny_run(**kw: Any) -> dict[str, Any]:
    """TrainArgs fields of a quick stories260K finetune (a few seconds), updated by `kw`."""
    return {
        "model": str(STORIES), "template": "alpaca", "adapter_len": 4, "adapter_layers": 5, "batch_size": 4,
        "lr": 2e-2, "warmup_steps": 2, "max_len": 200, "seed": 0, **kw,
    }  # fmt: skip


def cli_flags(**kw: Any) -> list[str]:
    """`--name value` for each keyword (`--name` alone for True), as `llama-adapter finetune` takes them."""
    out: list[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def modal_adapter(out: Path, model: Any, *, bind: bool = False, seed: int = 0) -> Path:
    """An adapter on `model` (stories260k) that takes every modality, saved to `out`: V1 prompts plus the
    clip-tiny visual projection (or, with `bind`, a bind network), and a `ModalitySet` with a random
    image space, audio bind projection and point encoder (modalities.safetensors). Gates are opened and
    the projections scaled so that each input visibly changes the generated text."""
    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, save_adapter
    from llama_adapter.multimodal import BindProjection, EmbeddingSpace, ModalitySet, PointEncoder

    torch.manual_seed(seed)
    d = 128  # clip-tiny's feature size
    kw = {"bind_dim": d, "bind_blocks": 1} if bind else {"visual_dim": d, "image_encoder": "clip-tiny"}
    a = AdaptedLLaMA(model, AdapterConfig(adapter_len=4, adapter_layers=model.config.n_layers, **kw))
    with torch.no_grad():
        a.adapter.gates.fill_(1.0)
        if bind:
            for blk in model.layers:
                blk.adapter_bind_gate.fill_(0.1)
        else:
            for p in a.adapter_visual.parameters():
                p.normal_(0, 0.2)
    space = EmbeddingSpace(torch.randn(d), torch.rand(d) + 0.5)
    mods = ModalitySet("clip-tiny", d, space=space, audio=BindProjection(512, d, 16),
                       points=PointEncoder(d, (8, 16), 16, points=64))  # fmt: skip
    save_adapter(a, out, metadata={"template": "plain"})
    mods.save(out)
    a.detach_base()  # adapters wrap the base's modules in place: leave the shared model as it was
    return out
