"""Several processes, one training run: process group, DDP / FSDP2 wrapping, and a `--devices` launcher.

How a run becomes distributed:
- `torchrun --nproc-per-node N -m llama_adapter finetune ...` sets RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT; `setup_distributed` reads them and joins the process group.
- `llama-adapter finetune --devices N ...` (no torchrun) starts N copies of itself with the same
  variables (`launch`), watches them and stops the others as soon as one fails.

What is replicated and what is sharded:
- Every rank computes the same global batch order (it depends only on seed and epoch) and takes its
  own micro-batches from it (see `train.Recipe.step`), so no DistributedSampler is needed and `N x batch b`
  computes the same step as `1 x batch N*b`.
- "ddp": `DistributedDataParallel` around the adapted model. Only parameters that require grad (the
  adapter) are all-reduced; the frozen base is simply loaded on every rank.
- "fsdp": `fully_shard` (FSDP2) on every block and on the root, so each rank holds 1/N of the frozen
  base and gathers a block's weights just before it runs. The adapter is kept out of FSDP
  (`ignored_params`): it is ~0.02% of a 7B model, so sharding it would save a few MB per device
  while making the optimizer state and checkpoints sharded DTensors. Replicated, its gradients are
  all-reduced here after backward (one flat all-reduce) and the optimizer, gradient clipping and
  checkpoints are exactly the single-process ones: a checkpoint from any world size loads into any
  other.

Every collective waits at most `dist_timeout_s`; a rank that dies or hangs makes the others fail
with a `DistributedError` instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

log = logging.getLogger("llama_adapter.distributed")

STRATEGIES = ("ddp", "fsdp")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank crashed or stopped responding."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_rank_world(devices: int | None) -> tuple[int, int]:
    """(rank, world size) this process has or will have: torchrun's, else the `--devices` plan."""
    if launched_by_torchrun():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, devices or 1


@dataclass
class Parallel:
    """This process's place in the run and the strategy; a single process is `Parallel()`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    strategy: str = "ddp"
    timeout_s: float = 600.0
    _adapter: list[tuple[str, nn.Parameter]] = field(default_factory=list, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- wrapping -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 around `model` (an AdaptedLLaMA); returns what the training step calls.

        Ranks start from rank 0's adapter weights, so an unseeded init cannot make them differ.
        """
        if not self.enabled:
            return model
        import torch.distributed as dist

        self._adapter = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._adapter:
            raise ValueError("the model has no trainable parameters to train in parallel")
        if self.strategy == "ddp":
            model.to(self.device)
            self._broadcast_adapter()
            from torch.nn.parallel import DistributedDataParallel as DDP

            # init_sync=False: DDP would otherwise broadcast every parameter, the frozen base
            # included (13 GB for a 7B model); each rank loads the same base anyway. The only
            # buffers (RoPE frequencies) are constants: no per-forward buffer sync either.
            no_buffer_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False}
            )
            return DDP(
                model,
                device_ids=[self.local_rank] if self.device.startswith("cuda") else None,
                init_sync=False,
                **no_buffer_sync,
            )
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.split(":")[0], (self.world_size,))
            ignored = {p for _, p in self._adapter}
            base = model.model if hasattr(model, "model") else model
            for block in base.layers:
                fully_shard(block, mesh=mesh, ignored_params=ignored)
            fully_shard(model, mesh=mesh, ignored_params=ignored)  # embeddings, final norm, output
            # FSDP places the (sharded) parameters it manages on the mesh's device; the ignored
            # adapter and the buffers follow here.
            with torch.no_grad():
                for _, p in self._adapter:
                    p.data = p.data.to(self.device)
                for mod in model.modules():
                    for name, b in list(mod.named_buffers(recurse=False)):
                        setattr(mod, name, b.to(self.device))
            self._broadcast_adapter()
            dist.barrier()
            return model
        raise ValueError(f"strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")

    def _broadcast_adapter(self) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for _, p in self._adapter:
                dist.broadcast(p.data, src=0)

    # -- the training step ----------------------------------------------------------------------
    def micro_step(self, trainable: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around forward + backward of one micro-batch: DDP all-reduces only on the last one."""
        if self.enabled and not last and hasattr(trainable, "no_sync"):
            return trainable.no_sync()
        return contextlib.nullcontext()

    def after_backward(self, step: int) -> None:
        """After the last micro-batch of `step` (0-based): FSDP's replicated adapter gradients are
        averaged over ranks here (DDP did it during backward)."""
        if not self.enabled or self.strategy != "fsdp":
            return
        import torch.distributed as dist

        params = [p for _, p in self._adapter]
        # One flat buffer: every gradient, then one "had a gradient" flag per parameter, so a
        # parameter that no rank used keeps grad=None exactly as in a single process.
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
            + [torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)]
        )
        dist.all_reduce(flat)
        flags = flat[-len(params) :]
        offset = 0
        for p, used in zip(params, flags.tolist()):
            n = p.numel()
            if used:
                g = (flat[offset : offset + n] / self.world_size).view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
            offset += n

    def share_resume_state(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Rank 0 has loaded a checkpoint into its model and optimizer (or found none: `state` None);
        copy adapter, optimizer state and trainer state to every rank. Only rank 0 needs to see
        the files, so a second node needs no shared filesystem to resume."""
        if not self.enabled:
            return state
        payload = None
        if self.is_main and state is not None:
            payload = {
                "state": state,
                "adapter": {n: p.detach().cpu() for n, p in self._adapter},
                "optimizer": _to_cpu(optimizer.state_dict()),
            }
        payload = self.broadcast_object(payload)
        if payload is None:
            return None
        if not self.is_main:
            with torch.no_grad():
                for n, p in self._adapter:
                    p.copy_(payload["adapter"][n])
            optimizer.load_state_dict(payload["optimizer"])
        return payload["state"]

    def all_sum(self, x: float) -> float:
        """`x` summed over all ranks (losses and token counts of a step or an evaluation)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (checkpoint state on resume: only rank 0 must see the files)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device) if self.device != "cpu" else None)
        return box[0]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# -- process group ------------------------------------------------------------------------------
def check_options(devices: int | None, strategy: str, device: str, timeout_s: float) -> None:
    """The distributed options of a run (TrainArgs.validate calls this before anything starts)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if devices is not None and devices < 1:
        raise ValueError(f"--devices {devices}: need at least 1")
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout-s {timeout_s}: must be positive (seconds a collective may wait)")
    if device.startswith("cuda") and devices and devices > 1 and not launched_by_torchrun():
        n = torch.cuda.device_count()
        if devices > n:
            raise ValueError(f"--devices {devices} --device cuda, but {n} GPUs are visible; use --devices {n} or less")


def setup_distributed(
    devices: int | None = None, strategy: str = "ddp", device: str = "cpu", timeout_s: float = 600.0
) -> Parallel:
    """Join the process group when started by torchrun (or `launch`); a no-op for one process.

    CUDA: one GPU per process, `cuda:LOCAL_RANK`, NCCL. CPU: gloo. The options were checked by
    `check_options` (TrainArgs.validate); what is checked here depends on how the processes started.
    """
    if not launched_by_torchrun():
        if devices not in (None, 1):
            raise AssertionError("--devices > 1 must go through launch()")  # the CLI does this
        return Parallel(device=device, strategy=strategy, timeout_s=timeout_s)
    rank, world = process_rank_world(devices)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if devices is not None and devices != world:
        raise ValueError(
            f"--devices {devices}, but torchrun started {world} processes; drop --devices when launching with torchrun"
        )
    if world == 1:
        return Parallel(device=device, strategy=strategy, timeout_s=timeout_s)
    import torch.distributed as dist

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}, but CUDA is not available here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank}, but only {torch.cuda.device_count()} GPUs are visible; "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except dist.DistError as e:
        raise DistributedError(
            f"rank {rank}: could not join the process group within {timeout_s:g}s "
            f"({_first_line(e)}); are all {world} processes running and is "
            f"MASTER_ADDR:MASTER_PORT reachable?"
        ) from e
    if rank != 0:
        logging.getLogger("llama_adapter").setLevel(logging.WARNING)
    log.info("distributed: %d processes, backend %s, strategy %s, device %s", world, backend, strategy, device)
    return Parallel(
        rank=rank, world_size=world, local_rank=local_rank, device=device, strategy=strategy, timeout_s=timeout_s
    )


def teardown(parallel: Parallel) -> None:
    if parallel.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def as_distributed_error(parallel: Parallel, e: BaseException) -> DistributedError | None:
    """A clear error for a failed/timed-out collective, or None if `e` is something else."""
    import torch.distributed as dist

    if not parallel.enabled or not isinstance(e, (dist.DistError, RuntimeError)):
        return None
    text = str(e)
    if not isinstance(e, dist.DistError) and not any(
        s in text for s in ("Gloo", "gloo", "NCCL", "Connection", "Timed out", "timed out", "peer")
    ):
        return None
    return DistributedError(
        f"rank {parallel.rank} of {parallel.world_size}: a collective failed ({_first_line(e)}); another rank "
        f"crashed or did not respond within --dist-timeout-s {parallel.timeout_s:g}; see that rank's error"
    )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


# -- the --devices launcher ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the launcher dies, so no orphan keeps a GPU busy."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def launch(argv: Sequence[str], nproc: int, *, grace_s: float = 5.0, poll_s: float = 0.1) -> int:
    """Run `python -m llama_adapter *argv` in `nproc` local processes, like torchrun on one node.

    Returns 0 when all succeed. As soon as one fails, the others are stopped (SIGTERM, then
    SIGKILL after `grace_s`) and its exit code is returned, with one line saying which rank failed.
    """
    if nproc < 1:
        raise ValueError(f"--devices {nproc}: need at least 1")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    # As torchrun: do not let N processes each start one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "llama_adapter", *argv]
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        procs.append(
            subprocess.Popen(
                cmd,
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        )
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r, code = failed[0]
                what = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                alive = [i for i, c in enumerate(codes) if c is None]
                print(
                    f"error: rank {r} of {nproc} {what}"
                    + (f"; stopping ranks {', '.join(map(str, alive))}" if alive else ""),
                    file=sys.stderr,
                )
                _stop(procs, grace_s)
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.contextmanager
def distributed_session(devices: int | None, strategy: str, device: str, timeout_s: float) -> Iterator[Parallel]:
    """`setup_distributed` ... `teardown`, turning failed collectives into `DistributedError`."""
    par = setup_distributed(devices, strategy, device, timeout_s)
    try:
        yield par
    except Exception as e:
        err = as_distributed_error(par, e)
        if err is not None:
            raise err from e
        raise
    finally:
        teardown(par)
