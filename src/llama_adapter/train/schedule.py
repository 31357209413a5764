"""How long a run is and how fast it learns: global batch, steps, warm-up + cosine learning rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    """Steps and learning rates of a run.

    Padded batches: a step is `global_batch` examples; the incomplete last batch of an epoch is dropped.
    Packed batches: a step is about `step_tokens` tokens (`data.packed_steps`), every example trained
    once per epoch. `--batch-tokens` sets that budget; by default it is the epoch's tokens divided by
    the padded run's number of steps, so both runs take as many steps with about as many examples.
    The paper's lr rule, lr = blr x examples per step / 256, uses the mean examples per step when
    packed (steps hold different numbers of examples; the loss is the mean over their response
    tokens either way)."""

    global_batch: int  # examples per optimizer step, all processes together (padded; packed: nominal)
    grad_accum: int  # micro-batches per process per step
    steps_per_epoch: int
    total_steps: int  # what the warm-up + cosine spans
    warmup: int
    lr: float  # peak
    min_lr: float
    max_steps: int  # where this run stops (<= total_steps)
    step_tokens: int | None = None  # packed: tokens per step, all processes (None: padded batches)
    examples_per_step: float = 0.0  # what the lr rule scales with

    @classmethod
    def plan(cls, args: TrainArgs, lengths: Sequence[int], world_size: int) -> Schedule:
        """The schedule of `args` over training examples of these token `lengths`."""
        n_train = len(lengths)
        if n_train == 0:
            raise ValueError("the training set is empty after encoding; check the data file and --max-len")
        grad_accum = resolve_grad_accum(args, world_size)
        global_batch = args.batch_size * grad_accum * world_size
        if args.pack and args.batch_tokens:
            step_tokens = args.batch_tokens
            steps_per_epoch = math.ceil(sum(lengths) / step_tokens)
            micro = grad_accum * world_size
            if steps_per_epoch * micro > n_train:
                raise ValueError(
                    f"--batch-tokens {step_tokens} cuts the {sum(lengths)} training tokens into {steps_per_epoch} "
                    f"steps of {micro} micro-batches, more micro-batches than the {n_train} examples; raise "
                    "--batch-tokens, or lower --grad-accum or --devices"
                )
        else:
            if n_train < global_batch:
                raise ValueError(
                    f"the training set has {n_train} examples, fewer than one global batch of {global_batch} "
                    f"(batch {args.batch_size} x accumulation {grad_accum} x {world_size} processes); lower "
                    "--batch-size, --grad-accum or --devices, or add data"
                )
            steps_per_epoch = n_train // global_batch
            step_tokens = math.ceil(sum(lengths) / steps_per_epoch) if args.pack else None
        per_step = n_train / steps_per_epoch if args.pack else float(global_batch)
        # A short run (max_steps) can still anneal fully: schedule_steps sets the schedule's length.
        total = args.schedule_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
        warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
        return cls(
            global_batch=global_batch,
            grad_accum=grad_accum,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            warmup=min(warmup, total),
            lr=args.lr if args.lr is not None else args.blr * per_step / 256,
            min_lr=args.min_lr,
            max_steps=min(total, args.max_steps) if args.max_steps else total,
            step_tokens=step_tokens,
            examples_per_step=per_step,
        )

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup, self.lr, self.min_lr)
