"""What a run leaves on disk, written so that a crash or a full disk costs at most the step in flight.

    OUT/adapter.safetensors, adapter_config.json   the final adapter (`finetune`)
    OUT/metrics.csv, loss.png                      one row per step; the loss plot
    OUT/checkpoints/step-0000050/                  adapter + optimizer.pt + trainer_state.json
    OUT/checkpoints/latest                         names the newest complete step directory

A step directory is written in full under a temporary name (`.step-0000050.tmp`) and renamed, and
only `step-N` names are ever read back, so a save cut short (kill -9, full disk) is never mistaken
for a checkpoint; `latest` is switched after the rename. metrics.csv is written before the
checkpoint it belongs to, so it always covers the checkpoint a resume starts from.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptedLLaMA, _atomic_write, load_adapter_weights, save_adapter

log = logging.getLogger("llama_adapter.train")

STEP_DIR = re.compile(r"step-(\d+)")
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.csv"
LOSS_PLOT = "loss.png"
RUN_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, METRICS, LOSS_PLOT)
METRIC_FIELDS = ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "val_loss"]
# What a damaged checkpoint file raises when read: truncated safetensors, zip or pickle, bad JSON,
# a missing file or key, tensors of another shape.
UNREADABLE = (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
# How a failed write shows up when it is not an OSError: torch's zip writer and safetensors.
_DISK_FULL_TEXT = (
    "No space left on device",
    "os error 28",
    "Disk quota exceeded",
    "unexpected pos",
    "file write failed",
)


class WriteError(OSError):
    """A file of the run could not be written (disk full, quota, permissions); the message says
    which, where, and which checkpoint is kept."""


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, in a few words, or None if `e` is not a failed write."""
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "the disk is full"
        return e.strerror or str(e)
    if isinstance(e, (RuntimeError, SafetensorError)) and any(s in str(e) for s in _DISK_FULL_TEXT):
        return "the disk is full"
    return None


@contextmanager
def writing(what: str, folder: Path, kept: Path | None) -> Iterator[None]:
    """Turns a failed write of `what` into one WriteError line that names `folder` and the last
    good checkpoint, which is left as it was."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        keep = f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"
        raise WriteError(
            f"could not write {what} in {folder}: {reason}; {keep}. Free space (or fix the folder), then "
            "rerun the same command with --resume"
        ) from e


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse what would silently lose work or silently do something else than asked."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a folder for the run")
    has_run = bool(Checkpointer(out).steps())
    if resume and not has_run:
        raise ValueError(
            f"--resume: {out} holds no training run (no checkpoints/step-*); check --out, or start without --resume"
        )
    if resume or overwrite:
        return
    if has_run:
        raise ValueError(
            f"{out} already holds a training run; pass --resume to continue it, --overwrite to start again, "
            "or choose another --out"
        )
    if (out / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{out} holds an adapter ({ADAPTER_CONFIG}) but no training run; pass --overwrite to replace it "
            "or choose another --out"
        )


class Checkpointer:
    """`out/checkpoints/step-N/` directories; `out/checkpoints/latest` names the newest complete one."""

    def __init__(self, out: Path, keep: int = 2) -> None:
        self.out = out
        self.root = out / "checkpoints"
        self.keep = keep

    def steps(self) -> list[Path]:
        """Step directories, newest first (only `step-N` names: a `.step-N.tmp` never finished)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.root.iterdir() if (m := STEP_DIR.fullmatch(d.name)) and d.is_dir()]
        return [d for _, d in sorted(found, reverse=True)]

    def candidates(self) -> list[Path]:
        """Where a resume looks, in order: the directory `latest` names, then the others, newest first."""
        steps = self.steps()
        pointer = self.root / "latest"
        named = self.root / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
        return [named, *(d for d in steps if d != named)] if named in steps else steps

    def latest(self) -> Path | None:
        found = self.candidates()
        return found[0] if found else None

    def clean(self) -> None:
        """Remove what a save cut short left behind (temporary step directories and files)."""
        for folder, names in ((self.root, (".step-*.tmp", ".latest.*.tmp", ".tmp*")), (self.out, (".tmp*",))):
            for pattern in names:
                for p in folder.glob(pattern) if folder.is_dir() else []:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        for name in RUN_FILES:  # _atomic_write's temporaries
            for p in self.out.glob(f".{name}.*.tmp") if self.out.is_dir() else []:
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        """--overwrite: forget the run in `out` (its checkpoints, metrics and adapter); other files stay."""
        shutil.rmtree(self.root, ignore_errors=True)
        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)

    def save(
        self, model: AdaptedLLaMA, optimizer: torch.optim.Optimizer, state: dict[str, Any], metadata: dict[str, Any]
    ) -> Path:
        step = state["step"]
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp"
        with writing(f"checkpoint {final.name}", self.root, self.latest()):
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                save_adapter(model, tmp, metadata=metadata)
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
                (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", lambda p: Path(p).write_text(final.name))
        for old in self.steps()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, model: AdaptedLLaMA, optimizer: torch.optim.Optimizer) -> tuple[Path, dict[str, Any]]:
        """Load the newest intact checkpoint into `model` and `optimizer`: (its directory, trainer state).
        A damaged one (truncated file, missing part) is skipped with one log line."""
        damaged: list[str] = []
        for d in self.candidates():
            try:
                state = self._read(d, model, optimizer)
            except UNREADABLE as e:
                damaged.append(f"{d.name}: {_first_line(e)}")
                continue
            if damaged:
                log.warning("checkpoint %s is damaged; resuming from %s, the newest intact one", damaged[0], d.name)
            return d, state
        if not damaged:
            raise ValueError(f"--resume: no checkpoint under {self.root}; start without --resume")
        raise ValueError(
            f"--resume: no intact checkpoint under {self.root} ({'; '.join(damaged)}); start again with --overwrite"
        )

    @staticmethod
    def _read(d: Path, model: AdaptedLLaMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = json.loads((d / TRAINER_STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError(f"{TRAINER_STATE} holds no step")
        opt_state = torch.load(d / OPTIMIZER, weights_only=True)
        load_adapter_weights(model, d / ADAPTER_WEIGHTS)  # checks every tensor before copying any
        optimizer.load_state_dict(opt_state)
        return state


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


# ------------------------------------------------------------------------------------ metrics, plot
def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    def write(p: str) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    _atomic_write(out / METRICS, write)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    p = out / METRICS
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(out: Path) -> Path | None:
    rows = read_metrics(out)
    if not rows:
        return None
    tr = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"] not in ("", None)]
    path = out / LOSS_PLOT
    with _quiet_matplotlib():
        import matplotlib  # here, not at the top: slow to import, and only needed for this plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", alpha=0.7)
        if va:
            ax.plot(*zip(*va), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (response tokens)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
    return path


@contextmanager
def _quiet_matplotlib() -> Iterator[None]:
    """matplotlib's own log lines are noise on a command's stderr: the first import in a fresh
    environment builds the font cache ("generated new fontManager"; after 5 s "Matplotlib is
    building the font cache"), and with -v every font lookup is logged."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
