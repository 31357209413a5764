"""The training loop: AdamW, warm-up + cosine, gradient accumulation, atomic checkpoints, resume.

Loss is computed on response tokens only and the output projection runs only where a label
exists. The loss of a step is the sum of token losses over the whole global batch divided by its
number of response tokens, so 1 process x batch 4 and 2 processes x batch 2 (or 4 x 1 with
accumulation) compute the same number.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import (
    ADAPTER_WEIGHTS,
    AdaptedLLaMA,
    AdapterConfig,
    _atomic_write,
    count_trainable,
    load_adapter_weights,
    param_groups,
    save_adapter,
)

if TYPE_CHECKING:
    from .distributed import Parallel

log = logging.getLogger("llama_adapter.train")


@dataclass
class TrainArgs:
    model: str = "smollm2-135m-instruct"
    data: str = ""  # one file, or several comma-separated (joint training: Alpaca JSON + image JSONL)
    out: str = "runs/adapter"  # run folder: adapter, step checkpoints, metrics.csv, loss.png
    template: str | None = None  # None: the tokenizer's own chat template, else "alpaca" / "chatml"
    adapter_len: int = 10  # K: prompt vectors per adapted layer
    adapter_layers: int | None = None  # None: min(30, n_layers), the paper's 30-of-32 rounded to the model
    gate_init: float = 0.0
    epochs: float = 5.0
    max_steps: int | None = None  # stop early (the schedule still spans `epochs` unless schedule_steps)
    schedule_steps: int | None = None  # warm-up + cosine span in optimizer steps (None: `epochs` worth)
    batch_size: int = 4  # per device, per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # fixes batch_size x grad_accum x processes; grad_accum is derived from it
    blr: float = 9e-3  # base lr: lr = blr * effective_batch / 256 (as the paper)
    lr: float | None = None  # absolute lr overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.02
    warmup_epochs: float = 2.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    clip_grad: float | None = 1.0
    max_len: int = 512
    val_fraction: float = 0.05
    max_val_examples: int = 200
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    device: str = "cpu"  # cpu | cuda (each process then uses cuda:LOCAL_RANK)
    devices: int | None = None  # processes, one per device: spawns them, or checks what torchrun started
    strategy: str = "ddp"  # ddp: frozen base replicated | fsdp: frozen base sharded (FSDP2); see distributed.py
    dist_timeout_s: float = 600.0  # a collective that waits longer fails the run (a rank crashed or hangs)
    resume: bool = False
    image_encoder: str | None = None  # multimodal: image JSONL data, a frozen encoder, a trainable projection
    image_encoder_weights: str | None = None  # local encoder checkpoint (None: the encoder's packaged weights)
    feature_cache: str | None = None  # folder caching encoder features by image hash (default OUT/feature_cache)
    val_data: str | None = None  # held-out data file(s), comma-separated (default: val_fraction of --data)
    # LLaMA-Adapter V2 (see v2.py): bias/scale on every block linear, trainable RMSNorm weights.
    bias_scale: bool = False  # V2: learnable y = scale * (W x + b) on every block linear (b=0, scale=1 at init)
    train_norms: bool = False  # V2: train the RMSNorm weights too
    visual_layers: int = 0  # early fusion: images reach only the first N adapted layers (0 = all; needs images)
    visual_query_blocks: int = 0  # V2 visual-query blocks over patch tokens (0 = global-feature projection)
    visual_query_dim: int = 0  # width of those blocks (0 = the model width)
    visual_query_heads: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


def check_args(args: TrainArgs) -> None:
    """Option combinations that cannot work, rejected before any data or weights are loaded; each
    message names the option to drop."""
    if not args.image_encoder:
        for name, flag in (
            ("visual_layers", "--visual-layers"),
            ("visual_query_blocks", "--visual-query-blocks"),
            ("visual_query_dim", "--visual-query-dim"),
            ("feature_cache", "--feature-cache"),
            ("image_encoder_weights", "--image-encoder-weights"),
        ):
            if getattr(args, name):
                raise ValueError(
                    f"{flag} needs images, but no --image-encoder is set; drop {flag} or add "
                    "--image-encoder efficientnet-lite0"
                )
    if args.visual_query_heads != 4 and not args.visual_query_blocks:
        raise ValueError("--visual-query-heads is set without --visual-query-blocks; drop --visual-query-heads")
    if args.visual_query_dim and not args.visual_query_blocks:
        raise ValueError("--visual-query-dim is set without --visual-query-blocks; drop --visual-query-dim")
    for name in ("visual_layers", "visual_query_blocks", "visual_query_dim"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.visual_layers and args.adapter_layers and args.visual_layers > args.adapter_layers:
        raise ValueError(
            f"--visual-layers {args.visual_layers} exceeds --adapter-layers {args.adapter_layers} "
            "(early fusion picks among the adapted layers); lower or drop --visual-layers"
        )


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def lm_head(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.model.output if isinstance(model, AdaptedLLaMA) else model.output


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], ctx: Any = None) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over response tokens, and their count. Projects only those positions."""
    idx, labels = batch["input_ids"], batch["labels"]
    kwargs = {"hidden_only": True}
    if ctx is not None:
        kwargs["ctx"] = ctx
    h = model(idx, **kwargs)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm_head(model)(h[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def evaluate_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    precision: str = "fp32",
    device: str = "cpu",
    make_ctx: Callable[[dict], Any] | None = None,
) -> float:
    total, n = evaluate_sums(model, batches, precision, device, make_ctx)
    return total / max(n, 1)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    precision: str = "fp32",
    device: str = "cpu",
    make_ctx: Callable[[dict], Any] | None = None,
) -> tuple[float, int]:
    """Summed response-token loss and token count (sums add up across ranks)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast(precision, device):
            loss, k = token_loss_sum(model, b, make_ctx(b) if make_ctx else None)
        total += loss.item()
        n += k
    model.train(was_training)
    return total, n


def autocast(precision: str, device: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision={precision!r}: choose fp32, bf16 or fp16")
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


class Checkpointer:
    """`out/checkpoints/step-N/` directories; `out/checkpoints/latest` names the newest complete one.

    A directory is written in full before `latest` is switched to it (atomic rename), so a crash
    at any point leaves the previous checkpoint intact and resumable.
    """

    def __init__(self, out: Path, keep: int = 2) -> None:
        self.root = out / "checkpoints"
        self.keep = keep

    def save(
        self, model: AdaptedLLaMA, optimizer: torch.optim.Optimizer, state: dict[str, Any], metadata: dict[str, Any]
    ) -> Path:
        step = state["step"]
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".step-{step:07d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(model, tmp, metadata=metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(self.root / "latest", lambda p: Path(p).write_text(final.name))
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        d = self.root / pointer.read_text().strip()
        return d if (d / "trainer_state.json").is_file() else None

    def load(self, model: AdaptedLLaMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        d = self.latest()
        if d is None:
            raise ValueError(f"--resume: no checkpoint under {self.root}; start without --resume")
        load_adapter_weights(model, d / ADAPTER_WEIGHTS)
        optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        return json.loads((d / "trainer_state.json").read_text())


@dataclass
class FitResult:
    steps: int
    train_losses: list[float]
    val_losses: list[tuple[int, float]]
    stopped: str = "done"  # done | max_steps | nan


def fit(
    model: AdaptedLLaMA,
    train_items: Sequence[Any],
    val_items: Sequence[Any],
    args: TrainArgs,
    *,
    pad_id: int,
    out: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    make_ctx: Callable[[dict], Any] | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    parallel: Parallel | None = None,
) -> FitResult:
    """Train the trainable parameters of `model` on encoded items (each with input_ids/labels).

    `parallel` (from distributed.setup_distributed) supplies rank, world_size and the DDP/FSDP wrap.
    """
    from .data import batch_indices, collate

    if parallel is not None:
        rank, world_size, wrap = parallel.rank, parallel.world_size, parallel.wrap
    if not len(train_items):
        raise ValueError("the training set is empty after encoding; check the data file and --max-len")
    grad_accum = resolve_grad_accum(args, world_size)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device
    global_batch = args.batch_size * grad_accum * world_size
    if len(train_items) < global_batch:
        raise ValueError(
            f"the training set has {len(train_items)} examples, fewer than one global batch of "
            f"{global_batch} (batch {args.batch_size} x accumulation {grad_accum} x {world_size} "
            "processes); lower --batch-size, --grad-accum or --devices, or add data"
        )
    lengths = [len(it.input_ids) for it in train_items]
    steps_per_epoch = max(1, len(train_items) // global_batch)
    # A short run (max_steps) can still anneal fully: schedule_steps sets the schedule's length.
    total_steps = args.schedule_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)
    lr = args.lr if args.lr is not None else args.blr * global_batch / 256
    max_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps

    trainable = wrap(model) if wrap else model
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    ckpt = Checkpointer(out) if out is not None else None
    step = 0
    metrics_rows: list[dict[str, Any]] = []
    is_main = rank == 0
    if args.resume and ckpt is not None:
        # Rank 0 reads the checkpoint and hands it to the others (they need not see the files).
        state = ckpt.load(model, optimizer) if is_main and ckpt.latest() is not None else None
        if parallel is not None:
            state = parallel.share_resume_state(optimizer, state)
        if state is not None:
            if state.get("global_batch", global_batch) != global_batch:
                raise ValueError(
                    f"--resume: the checkpoint was trained with a global batch of {state['global_batch']}, this "
                    f"run has {global_batch} (batch {args.batch_size} x accumulation {grad_accum} x {world_size} "
                    f"processes), so step {state['step']} would see other data at another lr; keep the global "
                    f"batch, e.g. --global-batch {state['global_batch']}"
                )
            step = state["step"]
            metrics_rows = [r for r in read_metrics(out) if int(r["step"]) <= step]
            log.info("resumed from %s at step %d", ckpt.latest(), step)

    val_batches = (
        [
            collate([val_items[i] for i in b], pad_id)
            for b in batch_indices(
                [len(v.input_ids) for v in val_items], args.batch_size, shuffle=False, seed=0, epoch=0
            )
        ]
        if len(val_items)
        else []
    )

    def run_eval() -> float:
        if world_size == 1:
            return evaluate_loss(model, val_batches, args.precision, device, make_ctx)
        # Every rank takes every world_size-th batch. FSDP forwards are collective, so all ranks run
        # the same number of them: one without a batch left repeats batch 0 and does not count it.
        total, n = 0.0, 0
        for i in range(rank, -(-len(val_batches) // world_size) * world_size, world_size):
            t, k = evaluate_sums(model, [val_batches[i % len(val_batches)]], args.precision, device, make_ctx)
            if i < len(val_batches):
                total, n = total + t, n + k
        return reduce_sum(total, world_size) / max(reduce_sum(n, world_size), 1)

    result = FitResult(0, [], [])
    if val_batches and step == 0:
        v = run_eval()
        result.val_losses.append((0, v))
        metrics_rows.append(
            {
                "step": 0,
                "epoch": 0.0,
                "loss": "",
                "lr": 0.0,
                "tokens": 0,
                "tokens_per_s": "",
                "elapsed_s": 0.0,
                "val_loss": v,
            }
        )
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=step, desc="finetune", file=sys.stderr, dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    tokens_seen = 0
    last_good = step
    epoch = step // steps_per_epoch
    while step < max_steps:
        batches = batch_indices(lengths, global_batch, shuffle=True, seed=args.seed, epoch=epoch, drop_last=True)
        for bi in range(step - epoch * steps_per_epoch, min(len(batches), steps_per_epoch)):
            if step >= max_steps:
                break
            cur_lr = cosine_lr(step, total_steps, warmup, lr, args.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            gb = batches[bi]
            n_tokens = sum(sum(1 for t in train_items[i].labels[1:] if t != -100) for i in gb)
            micro = [gb[j : j + args.batch_size] for j in range(0, len(gb), args.batch_size)]
            mine = micro[rank * grad_accum : (rank + 1) * grad_accum]
            loss_total = 0.0
            step_tokens = 0
            for j, mb in enumerate(mine):
                batch = {k: v.to(device) for k, v in collate([train_items[i] for i in mb], pad_id).items()}
                with parallel.micro_step(trainable, last=j == len(mine) - 1) if parallel else nullcontext():
                    with autocast(args.precision, device):
                        loss_sum, _ = token_loss_sum(trainable, batch, make_ctx(batch) if make_ctx else None)
                    # DDP averages gradients over ranks; scale back up so the step sees the global sum.
                    (loss_sum * world_size / max(n_tokens, 1)).backward()
                loss_total += loss_sum.item()
                step_tokens += int(batch["lengths"].sum())
            if parallel is not None:
                parallel.after_backward(step)
            loss_value = reduce_sum(loss_total, world_size) / max(n_tokens, 1)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                msg = (
                    f"loss became {loss_value} at step {step}; stopping. The last good checkpoint "
                    f"(step {last_good}) is kept; lower --lr/--blr or use --precision fp32"
                )
                log.error(msg)
                if bar:
                    bar.close()
                result.stopped = "nan"
                result.steps = step
                if is_main:
                    print(f"error: {msg}", file=sys.stderr)
                return result
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens * world_size
            result.train_losses.append(loss_value)
            elapsed = time.perf_counter() - t0
            row = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": round(loss_value, 6),
                "lr": cur_lr,
                "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                "elapsed_s": round(elapsed, 2),
                "val_loss": "",
            }
            if val_batches and (step % args.eval_every == 0 or step == max_steps):
                row["val_loss"] = run_eval()
                result.val_losses.append((step, row["val_loss"]))
            metrics_rows.append(row)
            if bar:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{cur_lr:.2e}", tok_s=row["tokens_per_s"])
                bar.update(1)
            if ckpt is not None and is_main and (step % args.save_every == 0 or step == max_steps):
                ckpt.save(
                    model,
                    optimizer,
                    {
                        "step": step,
                        "epoch": epoch,
                        "lr": cur_lr,
                        "global_batch": global_batch,
                        "world_size": world_size,
                    },
                    metadata or {},
                )
                write_metrics(out, metrics_rows)
                last_good = step
        epoch += 1
    if bar:
        bar.close()
    result.steps = step
    if out is not None and is_main:
        write_metrics(out, metrics_rows)
        plot_losses(out)
    result.stopped = "max_steps" if step < total_steps else "done"
    return result


def reduce_sum(x: float, world_size: int) -> float:
    if world_size == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def resolve_grad_accum(args: TrainArgs, world_size: int) -> int:
    """Micro-batches per process per step; `global_batch`, when set, decides it for any world size."""
    if args.batch_size < 1 or args.grad_accum < 1:
        raise ValueError(f"--batch-size {args.batch_size} and --grad-accum {args.grad_accum} must be >= 1")
    if args.global_batch is None:
        return args.grad_accum
    per = args.batch_size * world_size
    if args.global_batch < 1 or args.global_batch % per:
        raise ValueError(
            f"--global-batch {args.global_batch} is not divisible by --batch-size {args.batch_size} x "
            f"{world_size} processes = {per}; use a multiple of {per} or change --batch-size"
        )
    if args.grad_accum not in (1, args.global_batch // per):
        raise ValueError(
            f"--grad-accum {args.grad_accum} contradicts --global-batch {args.global_batch} "
            f"(which needs {args.global_batch // per}); give only one of them"
        )
    return args.global_batch // per


METRIC_FIELDS = ["step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "val_loss"]


def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    def write(p: str) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    _atomic_write(out / "metrics.csv", write)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    p = out / "metrics.csv"
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(out: Path) -> Path | None:
    rows = read_metrics(out)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"] not in ("", None)]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"] not in ("", None)]
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
    path = out / "loss.png"
    _atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def finetune(args: TrainArgs) -> FitResult:
    """Load base + data, wrap with an adapter, train, save `adapter.safetensors` + config in args.out.

    Started by torchrun (or `llama-adapter finetune --devices N`), every process runs this: it joins
    the process group, and rank 0 alone logs and writes files.
    """
    from .distributed import distributed_session

    with distributed_session(args.devices, args.strategy, args.device, args.dist_timeout_s) as par:
        return _finetune(replace(args, device=par.device), par)


def load_data(data: str, images: bool) -> list[dict[str, Any]]:
    """Examples from one or several comma-separated files. With `images`, image-text JSONL and
    Alpaca / chat files mix (joint training; text rows carry image None); without, a file that
    names images is an error rather than silently training on its captions alone."""
    from .data import file_has_images, load_examples, split_paths

    paths = split_paths(data)
    if images:
        from .multimodal import load_any_examples

        return [ex for p in paths for ex in load_any_examples(p)]
    for p in paths:
        if file_has_images(p):
            raise ValueError(
                f"{p} holds image-text rows but no --image-encoder is set; add --image-encoder "
                "efficientnet-lite0 or drop that file from --data"
            )
    return [ex for p in paths for ex in load_examples(p)]


def _finetune(args: TrainArgs, par: Parallel) -> FitResult:
    from .checkpoint import load_model
    from .data import InstructionDataset, split_holdout
    from .tokenizer import load_tokenizer

    check_args(args)
    out = Path(args.out)
    if (out / "checkpoints").exists() and not args.resume and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    encoder = None
    examples = load_data(args.data, images=bool(args.image_encoder))
    if args.image_encoder:
        from .multimodal import load_image_encoder

        encoder = load_image_encoder(args.image_encoder, args.image_encoder_weights)
    # bf16: the frozen base is stored in bf16 (half the memory; autocast computes in bf16 anyway),
    # the adapter and its optimizer state stay fp32.
    base = load_model(args.model, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    tok = load_tokenizer(base.config.extra["tokenizer"])
    template = args.template or getattr(tok, "chat_template", None) or "alpaca"
    n_layers = base.config.n_layers
    vis_kw: dict[str, Any] = {}
    if encoder is not None:
        from .multimodal import visual_config

        vis_kw = visual_config(encoder, args.image_encoder, tokens=bool(args.visual_query_blocks))
        vis_kw["visual_layers"] = args.visual_layers
        if args.visual_query_blocks:
            vis_kw.update(
                visual_query_blocks=args.visual_query_blocks,
                visual_query_dim=args.visual_query_dim,
                visual_query_heads=args.visual_query_heads,
            )
    cfg = AdapterConfig(
        adapter_len=args.adapter_len,
        adapter_layers=args.adapter_layers or min(30, n_layers),
        gate_init=args.gate_init,
        bias_scale=args.bias_scale,
        train_norms=args.train_norms,
        **vis_kw,
    )
    torch.manual_seed(args.seed)  # the same adapter init in every process and every run
    model = AdaptedLLaMA(base, cfg)
    if not (par.enabled and args.strategy == "fsdp"):  # FSDP moves each rank's shard to the device itself
        model = model.to(args.device)
    if args.val_data:
        train_ex = examples
        val_ex = load_data(args.val_data, images=encoder is not None)
    else:
        train_ex, val_ex = split_holdout(examples, args.val_fraction, seed=args.seed)
    val_ex = val_ex[: args.max_val_examples]
    make_ctx = None
    tv = vv = None
    if encoder is not None:
        from .multimodal import example_visuals, visual_make_ctx

        cache = args.feature_cache or str(out / "feature_cache")
        tokens = bool(args.visual_query_blocks)
        tv = example_visuals(train_ex, encoder, cache, tokens=tokens)
        vv = example_visuals(val_ex, encoder, cache, tokens=tokens) if val_ex else None
        make_ctx = visual_make_ctx(model)
    train_ds = InstructionDataset(train_ex, tok, template, args.max_len, visual=tv)
    val_ds = InstructionDataset(val_ex, tok, template, args.max_len, visual=vv) if val_ex else []
    log.info("trainable parameters: %d", count_trainable(model))
    metadata = {
        "train": {**asdict(args), "template": template, "n_train": len(train_ds), "n_val": len(val_ds)},
        "tokenizer": base.config.extra.get("tokenizer"),
        "template": template,
    }
    if encoder is not None:
        metadata["image_encoder_weights"] = args.image_encoder_weights
    out.mkdir(parents=True, exist_ok=True)
    res = fit(
        model, train_ds, val_ds, args, pad_id=tok.pad_id, out=out, metadata=metadata, parallel=par, make_ctx=make_ctx
    )
    if res.stopped != "nan" and par.is_main:
        save_adapter(model, out, metadata=metadata)
    return res
