"""A training run as a recipe, laid out as torchtune lays one out:

    recipe = Recipe(args, parallel)   # parallel: distributed.Parallel; Parallel() is one process
    recipe.setup()                    # read data, setup_model, setup_data, setup_optimizer, resume
    result = recipe.train()           # step; evaluate every eval_every; save every save_every
    recipe.save_adapter()

`finetune(args)` is exactly that; `fit(model, items, ...)` runs the same recipe on a model and encoded
items the caller built (experiments, examples).

The loss of a step is the sum of token losses over the whole global batch divided by its number of
response tokens, so 1 process x batch 4 and 2 processes x batch 2 (or 4 x 1 with accumulation)
compute the same number. A step is a list of micro-batches (lists of example indices), one or more
per process; `self.batch` makes a micro-batch's dict of tensors: packed (`--pack`, the default: its
examples side by side in one row, block-diagonal attention, no padding; see `data.packed_steps`) or
padded (`--no-pack`: length-grouped rows of `--batch-size` examples).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..adapter import AdaptedLLaMA, count_trainable, no_weight_decay, save_adapter
from ..checkpoint import load_model
from ..data import (
    InstructionDataset,
    batch_indices,
    collate,
    collate_packed,
    file_has_images,
    load_examples,
    pack_bins,
    packed_steps,
    split_holdout,
    split_paths,
    target_count,
)
from ..distributed import Parallel, distributed_session, process_rank_world
from ..loading import resolve_template, resolve_weights
from ..multimodal import example_visuals, load_any_examples, load_image_encoder, visual_config, visual_make_ctx
from ..tokenizer import load_tokenizer
from .args import TrainArgs, flag_names
from .checkpointing import METRICS, Checkpointer, plot_losses, read_metrics, write_metrics, writing
from .loss import autocast, batch_to, evaluate_sums, token_loss_sum
from .schedule import Schedule

log = logging.getLogger("llama_adapter.train")


@dataclass
class FitResult:
    steps: int
    train_losses: list[float]
    val_losses: list[tuple[int, float]]
    stopped: str = "done"  # done | max_steps | nan


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint as trainer_state.json."""

    step: int = 0
    tokens: int = 0  # real (unpadded) tokens trained on so far, all processes together
    elapsed_s: float = 0.0  # training time so far, over every process that resumed the run
    lr: float = 0.0


class Recipe:
    """One training run: setup, then step / evaluate / save until the schedule ends."""

    def __init__(
        self, args: TrainArgs, parallel: Parallel | None = None, *, out: Path | None = None, progress: bool = True
    ) -> None:
        self.args = args
        self.par = parallel or Parallel(device=args.device, strategy=args.strategy, timeout_s=args.dist_timeout_s)
        self.out = out
        self.checkpointer = Checkpointer(out) if out is not None else None
        self.progress = progress
        self.encoder: Any = None
        self.make_ctx: Callable[[dict], Any] | None = None
        self.metadata: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []  # metrics.csv
        self.state = TrainState()
        self.result = FitResult(0, [], [])
        self.last_saved = 0

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        train_ex, val_ex = self.read_examples()  # a malformed file fails before the model loads
        self.setup_model()
        self.setup_data(train_ex, val_ex)
        self.setup_optimizer()
        self.resume()

    def read_examples(self) -> tuple[list[dict], list[dict]]:
        """(train, held-out) examples: --val-data, else a seeded --val-fraction of --data."""
        args, images = self.args, bool(self.args.image_encoder)
        examples = load_data(args.data, images=images)
        if args.val_data:
            train_ex, val_ex = examples, load_data(args.val_data, images=images)
        else:
            train_ex, val_ex = split_holdout(examples, args.val_fraction, seed=args.seed)
        return train_ex, val_ex[: args.max_val_examples]

    def setup_model(self) -> None:
        """Frozen base (+ frozen image encoder) wrapped with a fresh, seeded adapter."""
        args = self.args
        if args.image_encoder:
            self.encoder = load_image_encoder(args.image_encoder, args.image_encoder_weights)
        base = load_base(args)
        self.tokenizer = load_tokenizer(base.config.extra["tokenizer"])
        self.template = resolve_template(args.template, self.tokenizer, purpose="instruct")
        visual = {}
        if self.encoder is not None:
            visual = visual_config(self.encoder, args.image_encoder, tokens=bool(args.visual_query_blocks))
        torch.manual_seed(args.seed)  # the same adapter init in every process and every run
        with flag_names():  # what only the base can tell, e.g. --adapter-layers above its depth
            model = AdaptedLLaMA(base, args.adapter_config(base.config.n_layers, **visual))
        if not (self.par.enabled and self.par.strategy == "fsdp"):  # FSDP moves each rank's shard itself
            model = model.to(self.par.device)
        self.model = model
        self.pad_id = self.tokenizer.pad_id
        self.make_ctx = visual_make_ctx(model) if self.encoder is not None else None
        log.info("trainable parameters: %d", count_trainable(model))

    def setup_data(self, train_ex: list[dict], val_ex: list[dict]) -> None:
        """Encode (prompt masked, response trained), with image features for multimodal data."""
        args, tok = self.args, self.tokenizer
        tv = vv = None
        if self.encoder is not None:
            cache = args.feature_cache or str(Path(args.out) / "feature_cache")
            tokens = bool(args.visual_query_blocks)
            tv = example_visuals(train_ex, self.encoder, cache, tokens=tokens)
            vv = example_visuals(val_ex, self.encoder, cache, tokens=tokens) if val_ex else None
        # No cut by default: a packed step holds long examples as well as short ones.
        max_len = args.max_len or self.model.config.max_seq_len
        self.train_items = InstructionDataset(train_ex, tok, self.template, max_len, visual=tv)
        self.val_items = InstructionDataset(val_ex, tok, self.template, max_len, visual=vv) if val_ex else []
        lengths = self.train_items.lengths
        log.info(
            "training examples: %d (%d tokens, longest %d); %d truncated, %d dropped at max length %d",
            len(lengths), sum(lengths), max(lengths, default=0), self.train_items.n_truncated,
            self.train_items.n_dropped, max_len,
        )  # fmt: skip
        n = {"n_train": len(self.train_items), "n_val": len(self.val_items)}
        self.metadata = {
            "train": {**asdict(args), "device": self.par.device, "template": self.template, **n},
            "tokenizer": self.model.config.extra.get("tokenizer"),
            "template": self.template,
        }
        if self.encoder is not None:
            self.metadata["image_encoder_weights"] = args.image_encoder_weights

    def use(
        self,
        model: torch.nn.Module,
        train_items: Sequence[Any],
        val_items: Sequence[Any],
        *,
        pad_id: int,
        make_ctx: Callable[[dict], Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """A model and encoded items built by the caller, in place of setup_model + setup_data."""
        self.model, self.train_items, self.val_items = model, train_items, val_items
        self.pad_id = pad_id
        self.make_ctx = make_ctx
        self.metadata = metadata or {}

    def setup_optimizer(self) -> None:
        """Schedule, DDP/FSDP wrapping, AdamW over what requires grad (no decay on gates, norms, biases),
        the held-out batches."""
        args = self.args
        self.lengths = [len(it.input_ids) for it in self.train_items]
        self.schedule = Schedule.plan(args, self.lengths, self.par.world_size)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.trainable = self.par.wrap(self.model)
        self.optimizer = torch.optim.AdamW(
            trainable_groups(self.model, args.weight_decay), lr=self.schedule.lr, betas=(0.9, 0.95)
        )
        self.val_batches = [self.batch([self.val_items[i] for i in b]) for b in self._val_order()]
        s = self.schedule
        if s.step_tokens:
            log.info(
                "packed steps of about %d tokens (%.1f examples on average), %d per epoch; lr %.3g",
                s.step_tokens, s.examples_per_step, s.steps_per_epoch, s.lr,
            )  # fmt: skip

    def batch(self, items: Sequence[Any]) -> dict[str, Any]:
        """A micro-batch of encoded items: one packed row, or padded rows (--no-pack)."""
        return collate_packed([items], self.pad_id) if self.args.pack else collate(items, self.pad_id)

    def _val_order(self) -> list[list[int]]:
        """Held-out micro-batches: packed into rows of about a micro-batch's tokens, or padded."""
        lengths = [len(v.input_ids) for v in self.val_items]
        if not lengths:
            return []
        if not self.args.pack:
            return batch_indices(lengths, self.args.batch_size, shuffle=False)
        per_micro = self.schedule.step_tokens / (self.schedule.grad_accum * self.par.world_size)
        bins = pack_bins(lengths, min(len(lengths), math.ceil(sum(lengths) / per_micro)), jitter=0.0)
        return [b for b in bins if b]

    def resume(self) -> None:
        """Tidy the run folder (what a crash left, or everything with --overwrite), then with
        --resume continue from its newest intact checkpoint. Only rank 0 reads the files; it hands
        adapter, optimizer and trainer state to the others."""
        ckpt, args = self.checkpointer, self.args
        if ckpt is None:
            return
        if self.par.is_main:
            ckpt.clean()
            if args.overwrite:
                ckpt.clear()
        if not args.resume:
            return
        where, state = ckpt.load(self.model, self.optimizer) if self.par.is_main else (None, None)
        state = self.par.share_resume_state(self.optimizer, state)
        assert state is not None, "rank 0 loads a checkpoint or raises"
        self._check_resumable(state)
        step = state["step"]
        self.rows = [r for r in read_metrics(ckpt.out) if int(r["step"]) <= step] if self.par.is_main else []
        tokens = state.get("tokens", int(self.rows[-1]["tokens"] or 0) if self.rows else 0)
        self.state = TrainState(step, tokens, state.get("elapsed_s", 0.0), state.get("lr", 0.0))
        self.last_saved = step
        # The result describes the whole run, the part before this process included.
        self.result.train_losses = [float(r["loss"]) for r in self.rows if r["loss"]]
        self.result.val_losses = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["val_loss"]]
        log.info("resumed from %s at step %d", where, step)
        if step >= self.schedule.max_steps:  # e.g. stopped after its last checkpoint, before the adapter
            log.info("the run is already at step %d of %d: nothing left to train", step, self.schedule.max_steps)

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """The checkpoint's steps are this run's: same global batch (unless --batch-tokens fixes
        the steps) and the same packing."""
        s, args = self.schedule, self.args
        if not args.batch_tokens and state.get("global_batch", s.global_batch) != s.global_batch:
            raise ValueError(
                f"--resume: the checkpoint was trained with a global batch of {state['global_batch']}, this run "
                f"has {s.global_batch} (batch {args.batch_size} x accumulation {s.grad_accum} x "
                f"{self.par.world_size} processes), so step {state['step']} would see other data at another lr; "
                f"keep the global batch, e.g. --global-batch {state['global_batch']}"
            )
        had = state.get("step_tokens")  # absent: a checkpoint from before packing, padded
        if had != s.step_tokens:
            then = f"packed steps of {had} tokens" if had else "padded batches"
            now = f"packed steps of {s.step_tokens} tokens" if s.step_tokens else "padded batches"
            fix = "without --no-pack" if had else "with --no-pack"
            if had and s.step_tokens:
                fix = f"with --batch-tokens {had}"
            raise ValueError(
                f"--resume: the checkpoint was trained with {then}, this run has {now}, so step "
                f"{state['step']} would see other data; resume {fix}"
            )

    # -------------------------------------------------------------------------------------- loop
    def train(self) -> FitResult:
        """Steps until the schedule's max_steps; evaluate every eval_every, save every save_every."""
        s, st, args = self.schedule, self.state, self.args
        if self.val_batches and st.step == 0:
            self._record(loss=None, val=self.evaluate())
        bar = None
        if self.progress and self.par.is_main:
            bar = tqdm(total=s.max_steps, initial=st.step, desc="finetune", file=sys.stderr, dynamic_ncols=True)
        self.model.train()
        self._clock = (time.perf_counter(), st.tokens, st.elapsed_s)
        bad_loss = None
        try:  # the bar is closed before any error is printed, so the error starts a line
            while st.step < s.max_steps and bad_loss is None:
                for indices in self._epoch_batches():
                    loss = self.step(indices)
                    if not math.isfinite(loss):
                        bad_loss = loss
                        break
                    last = st.step == s.max_steps
                    val = self.evaluate() if self.val_batches and (st.step % args.eval_every == 0 or last) else None
                    self._record(loss, val, bar)
                    if self.checkpointer and self.par.is_main and (st.step % args.save_every == 0 or last):
                        self.save()
                    if last:
                        break
        finally:
            if bar is not None:
                bar.close()
        return self._finish() if bad_loss is None else self._stop_on_nan(bad_loss)

    def _epoch_batches(self) -> list[list[list[int]]]:
        """The rest of the current epoch's steps, each a list of micro-batches (grad_accum per process,
        rank r's after rank r-1's). The order depends only on seed and epoch, so every rank and every
        resume sees the same one."""
        s, seed = self.schedule, self.args.seed
        epoch, done = divmod(self.state.step, s.steps_per_epoch)
        micro = s.grad_accum * self.par.world_size
        if s.step_tokens:
            steps = packed_steps(self.lengths, s.steps_per_epoch, micro, seed=seed, epoch=epoch)
        else:
            order = batch_indices(self.lengths, s.global_batch, shuffle=True, seed=seed, epoch=epoch, drop_last=True)
            per = self.args.batch_size
            steps = [[b[j : j + per] for j in range(0, len(b), per)] for b in order]
        return steps[done : s.steps_per_epoch]

    def step(self, micro: Sequence[Sequence[int]]) -> float:
        """One optimizer step over the micro-batches `micro` (all processes'): forward + backward of
        this rank's, then clip and update. Returns the step's mean response-token loss; a loss that
        is not finite is returned without updating anything."""
        s, par, st = self.schedule, self.par, self.state
        lr = s.lr_at(st.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n_targets = sum(target_count(self.train_items[i]) for mb in micro for i in mb)
        mine = micro[par.rank * s.grad_accum : (par.rank + 1) * s.grad_accum]
        loss_sum = 0.0
        for j, mb in enumerate(mine):
            batch = batch_to(self.batch([self.train_items[i] for i in mb]), par.device)
            with par.micro_step(self.trainable, last=j == len(mine) - 1):
                with autocast(self.args.precision, par.device):
                    loss, _ = token_loss_sum(self.trainable, batch, self.make_ctx(batch) if self.make_ctx else None)
                # DDP averages gradients over ranks; scale back up so the step sees the global sum.
                (loss * par.world_size / max(n_targets, 1)).backward()
            loss_sum += loss.item()
        tokens = sum(self.lengths[i] for mb in micro for i in mb)  # every process's, counted alike on each
        par.after_backward(st.step)
        mean = par.all_sum(loss_sum) / max(n_targets, 1)
        if math.isfinite(mean):
            if self.args.clip_grad:
                params = [p for p in self.model.parameters() if p.requires_grad]
                torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad)
            self.optimizer.step()
            st.step, st.tokens, st.lr = st.step + 1, st.tokens + tokens, lr
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def evaluate(self) -> float:
        """Held-out loss over all processes. Each rank takes every world_size-th batch; FSDP forwards
        are collective, so all ranks run as many: one without a batch left repeats batch 0 and does
        not count it."""
        par, n = self.par, len(self.val_batches)
        total, count = 0.0, 0
        for i in range(par.rank, -(-n // par.world_size) * par.world_size, par.world_size):
            batch = [self.val_batches[i % n]]
            t, k = evaluate_sums(self.model, batch, self.args.precision, par.device, self.make_ctx)
            if i < n:
                total, count = total + t, count + k
        return par.all_sum(total) / max(par.all_sum(count), 1)

    def save(self) -> None:
        """metrics.csv (first, so it covers every checkpoint), then this step's checkpoint."""
        ckpt, st = self.checkpointer, self.state
        with writing(METRICS, ckpt.out, ckpt.latest()):
            write_metrics(ckpt.out, self.rows)
        trainer_state = {
            "step": st.step,
            "epoch": round(st.step / self.schedule.steps_per_epoch, 4),
            "lr": st.lr,
            "tokens": st.tokens,
            "elapsed_s": round(st.elapsed_s, 3),
            "global_batch": self.schedule.global_batch,
            "step_tokens": self.schedule.step_tokens,
            "world_size": self.par.world_size,
        }
        ckpt.save(self.model, self.optimizer, trainer_state, self.metadata)
        self.last_saved = st.step

    def save_adapter(self) -> None:
        """The trained adapter in `out` (adapter.safetensors + adapter_config.json); rank 0 writes."""
        ckpt = self.checkpointer
        if ckpt is not None and self.par.is_main:
            with writing("the adapter", ckpt.out, ckpt.latest()):
                save_adapter(self.model, ckpt.out, metadata=self.metadata)

    # ------------------------------------------------------------------------------------ record
    def _record(self, loss: float | None, val: float | None, bar: tqdm | None = None) -> None:
        """One metrics.csv row (and the progress bar) for the step just taken; `loss` None: the
        held-out loss before training."""
        st = self.state
        tok_s: float | str = ""
        if loss is not None:
            t0, tokens0, elapsed0 = self._clock
            took = time.perf_counter() - t0
            st.elapsed_s = elapsed0 + took
            tok_s = round((st.tokens - tokens0) / max(took, 1e-9), 1)
        self.rows.append(
            {
                "step": st.step,
                "epoch": round(st.step / self.schedule.steps_per_epoch, 4),
                "loss": "" if loss is None else round(loss, 6),
                "lr": st.lr,
                "tokens": st.tokens,
                "tokens_per_s": tok_s,
                "elapsed_s": round(st.elapsed_s, 2),
                "val_loss": "" if val is None else val,
            }
        )
        if loss is not None:
            self.result.train_losses.append(loss)
        if val is not None:
            self.result.val_losses.append((st.step, val))
        if bar is not None:
            if st.step % self.args.log_every == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{st.lr:.2e}", tok_s=tok_s)
            bar.update(1)

    def _stop_on_nan(self, loss: float) -> FitResult:
        msg = (
            f"loss became {loss} at step {self.state.step}; stopping. The last good checkpoint "
            f"(step {self.last_saved}) is kept; lower --lr/--blr or use --precision fp32"
        )
        log.error(msg)
        if self.par.is_main:
            print(f"error: {msg}", file=sys.stderr)
        self.result.stopped, self.result.steps = "nan", self.state.step
        return self.result

    def _finish(self) -> FitResult:
        ckpt = self.checkpointer
        if ckpt is not None and self.par.is_main:
            with writing(f"{METRICS} and the loss plot", ckpt.out, ckpt.latest()):
                write_metrics(ckpt.out, self.rows)
                plot_losses(ckpt.out)
        self.result.steps = self.state.step
        self.result.stopped = "max_steps" if self.state.step < self.schedule.total_steps else "done"
        return self.result


# ------------------------------------------------------------------------------------- entry points
def finetune(args: TrainArgs) -> FitResult:
    """Load base + data, wrap with an adapter, train, save `adapter.safetensors` + config in args.out.

    Started by torchrun (or `llama-adapter finetune --devices N`), every process runs this: it joins
    the process group, and rank 0 alone logs and writes files. Every option is checked first.
    """
    rank, world_size = process_rank_world(args.devices)
    args.validate(world_size, main=rank == 0)
    with distributed_session(args.devices, args.strategy, args.device, args.dist_timeout_s) as par:
        recipe = Recipe(args, par, out=Path(args.out))
        recipe.setup()
        result = recipe.train()
        if result.stopped != "nan":
            recipe.save_adapter()
        return result


def fit(
    model: torch.nn.Module,
    train_items: Sequence[Any],
    val_items: Sequence[Any],
    args: TrainArgs,
    *,
    pad_id: int,
    out: Path | None = None,
    parallel: Parallel | None = None,
    make_ctx: Callable[[dict], Any] | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> FitResult:
    """Train the parameters of `model` that require grad (an AdaptedLLaMA's adapter, or e.g. every
    weight of a plain LLaMA for full fine-tuning) on encoded items (each with input_ids/labels);
    `out` (optional) receives checkpoints, metrics.csv and loss.png; `parallel` is this process's
    place in a distributed run (distributed.setup_distributed), by default a single process."""
    args.check_options(parallel.world_size if parallel else 1)
    recipe = Recipe(args, parallel, out=out, progress=progress)
    recipe.use(model, train_items, val_items, pad_id=pad_id, make_ctx=make_ctx, metadata=metadata)
    recipe.setup_optimizer()
    recipe.resume()
    return recipe.train()


def trainable_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the parameters that require grad: an adapter's (`mark_trainable` sets them
    by THE predicate, so these are the saved ones), or any other model's (full fine-tuning, LoRA:
    `fit` trains those too). Gates, norms, biases and scales are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_base(args: TrainArgs) -> Any:
    """The frozen base model. --precision bf16 stores it in bf16 (half the memory; autocast computes
    in bf16 anyway; the adapter and its optimizer state stay fp32). --weights packs it instead
    (`loading.resolve_weights`, as for generation): less memory, but each large product then
    dequantizes before an fp32 GEMM, so float stays the default."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    weights = resolve_weights(args.weights, args.model, "instruct") if args.weights else None
    return load_model(args.model, dtype=dtype, weights=weights)


def load_data(data: str, images: bool) -> list[dict[str, Any]]:
    """Examples from one or several comma-separated files. With `images`, image-text JSONL and
    Alpaca / chat files mix (joint training; text rows carry image None); without, a file that
    names images is an error rather than silently training on its captions alone."""
    paths = split_paths(data)
    if images:
        return [ex for p in paths for ex in load_any_examples(p)]
    for p in paths:
        if file_has_images(p):
            raise ValueError(
                f"{p} holds image-text rows but no --image-encoder is set; add --image-encoder "
                "efficientnet-lite0 or drop that file from --data"
            )
    return [ex for p in paths for ex in load_examples(p)]
