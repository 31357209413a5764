"""How long a run is and how fast it learns: global batch, steps, warm-up + cosine learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .args import TrainArgs, resolve_grad_accum


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up over `warmup` steps to `lr`, then a cosine down to `min_lr` at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedule:
    global_batch: int  # examples per optimizer step, all processes together
    grad_accum: int  # micro-batches per process per step
    steps_per_epoch: int
    total_steps: int  # what the warm-up + cosine spans
    warmup: int
    lr: float  # peak
    min_lr: float
    max_steps: int  # where this run stops (<= total_steps)

    @classmethod
    def plan(cls, args: TrainArgs, n_train: int, world_size: int) -> Schedule:
        if n_train == 0:
            raise ValueError("the training set is empty after encoding; check the data file and --max-len")
        grad_accum = resolve_grad_accum(args, world_size)
        global_batch = args.batch_size * grad_accum * world_size
        if n_train < global_batch:
            raise ValueError(
                f"the training set has {n_train} examples, fewer than one global batch of {global_batch} "
                f"(batch {args.batch_size} x accumulation {grad_accum} x {world_size} processes); lower "
                "--batch-size, --grad-accum or --devices, or add data"
            )
        steps_per_epoch = n_train // global_batch  # the incomplete last batch is dropped
        # A short run (max_steps) can still anneal fully: schedule_steps sets the schedule's length.
        total = args.schedule_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
        warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
        return cls(
            global_batch=global_batch,
            grad_accum=grad_accum,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            warmup=min(warmup, total),
            lr=args.lr if args.lr is not None else args.blr * global_batch / 256,
            min_lr=args.min_lr,
            max_steps=min(total, args.max_steps) if args.max_steps else total,
        )

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup, self.lr, self.min_lr)
