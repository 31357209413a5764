"""Build (once, cached) and load the C++/AVX2 kernels in csrc/quant.cpp, or say why not.

The extension is compiled on first use with torch.utils.cpp_extension into
`$LLAMA_ADAPTER_CACHE/ext-<hash>` (default `~/.cache/llama_adapter`), where the hash covers the source, the
flags, torch's and Python's versions: every process after the first loads the cached .so in milliseconds.
A file lock (flock, released by the kernel if the holder dies) serialises concurrent first builds.

Without a compiler, without AVX2, when the build fails, or with `LLAMA_ADAPTER_NO_EXT=1`, `ops()` returns
None after one warning and callers use the torch reference path (dequantize + F.linear).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

NAMESPACE = "llama_adapter_quant"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [CSRC / "quant.cpp", CSRC / "convert.cpp"]
# -ffp-contract=off: conversions must round a*b+c twice, like numpy/torch, to stay bit-exact with them.
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled here; without the
# flag it silently runs on one thread. The libgomp.so.1 it links resolves, by soname, to the copy torch has
# already loaded, so torch and the kernels share one OpenMP runtime and one thread pool.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]
NO_EXT_ENV = "LLAMA_ADAPTER_NO_EXT"
CACHE_ENV = "LLAMA_ADAPTER_CACHE"

_state: dict[str, Any] = {}  # "ops": the loaded namespace or None; "reason": why not; "build_s": seconds
_init_lock = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "llama_adapter"


def _build_hash() -> str:
    h = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES))
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, platform.python_version(), platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _unavailable_reason() -> str | None:
    if os.environ.get(NO_EXT_ENV, "") not in ("", "0"):
        return f"{NO_EXT_ENV} is set"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch reports {cap})"
    missing = [str(src) for src in SOURCES if not src.exists()]
    if missing:
        return f"{', '.join(missing)} missing from the installed package"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    return None


class _FileLock:
    """An exclusive flock on `path` (no-op where fcntl does not exist)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:  # Windows: concurrent first builds are not serialised
            return self
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    name = f"{NAMESPACE}_{_build_hash()}"
    build = cache_dir() / f"ext-{_build_hash()}"
    build.mkdir(parents=True, exist_ok=True)
    so, failed = build / f"{name}.so", build / "FAILED.txt"
    with _FileLock(build.with_suffix(".lock")):
        if failed.exists():  # do not spend half a minute on the same failing build in every process
            raise RuntimeError(f"an earlier build failed, see {failed} (delete it to try again)")
        if not so.exists():
            # torch's own baton file outlives a build that was killed and would block every later one forever;
            # under our flock nobody else is building, so a leftover one is stale.
            (build / "lock").unlink(missing_ok=True)
            t0 = time.perf_counter()
            log.warning("llama_adapter.quant: compiling the CPU kernels once into %s (30-60 s)", build)
            try:
                cpp_extension.load(
                    name=name,
                    sources=[str(src) for src in SOURCES],
                    extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS,
                    build_directory=str(build),
                    is_python_module=False,
                    verbose=False,
                )
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}\n")
                raise
            _state["build_s"] = time.perf_counter() - t0
            return  # load() has loaded it
    torch.ops.load_library(str(so))


def _register_fakes() -> None:
    """Shapes without running anything, so torch.compile / FakeTensor tracing sees through the ops."""

    @torch.library.register_fake(f"{NAMESPACE}::linear")
    def _linear(x: torch.Tensor, w: torch.Tensor, fmt: int, mode: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(f"{NAMESPACE}::linear_grad")
    def _linear_grad(gy: torch.Tensor, w: torch.Tensor, fmt: int, k: int) -> torch.Tensor:
        return gy.new_empty(gy.shape[0], k)

    @torch.library.register_fake(f"{NAMESPACE}::dequantize")
    def _dequantize(w: torch.Tensor, fmt: int, k: int) -> torch.Tensor:
        return w.new_empty(w.shape[0], k, dtype=torch.float32)

    @torch.library.register_fake(f"{NAMESPACE}::quantize")
    def _quantize(x: torch.Tensor, fmt: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], x.shape[1] // 32 * (18, 20, 34)[fmt], dtype=torch.uint8)

    @torch.library.register_fake(f"{NAMESPACE}::to_x8")
    def _to_x8(w: torch.Tensor, fmt: int, k: int) -> torch.Tensor:
        return torch.empty_like(w)

    @torch.library.register_fake(f"{NAMESPACE}::from_x8")
    def _from_x8(w: torch.Tensor, fmt: int, k: int) -> torch.Tensor:
        return torch.empty_like(w)

    @torch.library.register_fake(f"{NAMESPACE}::embedding")
    def _embedding(w: torch.Tensor, fmt: int, k: int, ids: torch.Tensor) -> torch.Tensor:
        return w.new_empty(*ids.shape, k, dtype=torch.float32)


def ops() -> Any | None:
    """`torch.ops.llama_adapter_quant` once the kernels are built and loaded, else None (warned once)."""
    if "ops" in _state:
        return _state["ops"]
    with _init_lock:  # two threads' first calls: one builds and loads, the other waits for it
        if "ops" not in _state:
            _init()
    return _state["ops"]


def _init() -> None:
    reason = _unavailable_reason()
    if reason is None:
        try:
            _build_and_load()
            _register_fakes()
        except Exception as e:  # a broken toolchain must not take inference down with it
            first = str(e).strip().splitlines()
            reason = f"building the kernels failed ({type(e).__name__}: {first[-1] if first else ''})"
    if reason is not None:
        # With no logging configured, Python's last-resort handler prints this one line to stderr.
        log.warning("llama_adapter.quant: %s; using the slower torch reference path", reason)
        _state["ops"], _state["reason"] = None, reason
        return
    _state["ops"], _state["reason"] = getattr(torch.ops, NAMESPACE), None


def available() -> bool:
    """Whether the C++ kernels are in use (builds them on first call)."""
    return ops() is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not in use, or None when they are."""
    ops()
    return _state.get("reason")


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run the torch reference path inside the block even where the kernels are loaded (tests, comparisons);
    a loaded library cannot be unloaded, so this is how one process covers both paths."""
    ops()
    saved = dict(_state)
    _state["ops"], _state["reason"] = None, "reference_path() is active"
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)
