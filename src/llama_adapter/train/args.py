"""Training options: one dataclass, every option checked once before anything is loaded.

The adapter's own options (K, L, gate init, V2 bias/scale and norms, early fusion, visual query)
belong to `AdapterConfig`: `TrainArgs` gets them as fields generated from it (same names, types and
defaults; `finetune --help` takes their help from AdapterConfig's comments) and `AdapterConfig.validate`
is what checks them. Before loading, it checks them against a stand-in for what only the base model
and the image encoder can tell (depth, feature size); building the adapter checks them again with
the real ones, so a wrong `--adapter-layers` for a model's depth fails right after the base loads,
before any data is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import AdapterConfig, Config
from ..data import check_data_file, split_paths
from ..distributed import check_options as check_distributed_options
from ..loading import WEIGHTS
from ..multimodal import ENCODER_NAMES
from ..tokenizer import TEMPLATES
from .checkpointing import check_run_folder

# The AdapterConfig fields a training run chooses; the others describe the image encoder
# (visual_dim, visual_tokens...: set from the encoder) or are not trained from the command line.
ADAPTER_OPTIONS = (
    "adapter_len",
    "adapter_layers",
    "gate_init",
    "bias_scale",
    "train_norms",
    "visual_layers",
    "visual_query_blocks",
    "visual_query_dim",
    "visual_query_heads",
)
DEFAULT_ADAPTER_LAYERS = AdapterConfig().adapter_layers  # the paper's 30 (of LLaMA-7B's 32)
PRECISIONS = ("fp32", "bf16", "fp16")

AdapterOptions = make_dataclass(
    "AdapterOptions",
    [(f.name, f.type, field(default=f.default)) for f in fields(AdapterConfig) if f.name in ADAPTER_OPTIONS],
)
AdapterOptions.__module__ = __name__
AdapterOptions.__doc__ = "AdapterConfig's trainable choices, as TrainArgs fields (generated from AdapterConfig)."


@dataclass
class TrainArgs(AdapterOptions):  # type: ignore[misc, valid-type]
    """Everything a `finetune` run is given; one field per command-line flag (`finetune --help`
    takes each flag's help from the comment after its field, or AdapterConfig's for the adapter's)."""

    model: str = "smollm2-135m-instruct"
    data: str = ""  # one file, or several comma-separated (joint training: Alpaca JSON + image JSONL)
    out: str = "runs/adapter"  # run folder: adapter, step checkpoints, metrics.csv, loss.png
    template: str | None = None  # None: the tokenizer's own chat template, else "alpaca" / "chatml"
    # Differs from AdapterConfig's default: training picks the depth from the model it loads.
    adapter_layers: int | None = None  # None: min(30, n_layers), the paper's 30-of-32 rounded to the model
    epochs: float = 5.0
    max_steps: int | None = None  # stop early (the schedule still spans `epochs` unless schedule_steps)
    schedule_steps: int | None = None  # warm-up + cosine span in optimizer steps (None: `epochs` worth)
    batch_size: int = 4  # per device, per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # fixes batch_size x grad_accum x processes; grad_accum is derived from it
    # Packed batches: examples side by side in one row per micro-batch, each seeing only itself, so no
    # work goes to padding; a step is a token budget rather than a number of padded rows.
    pack: bool = True  # pack examples into rows (--no-pack: length-grouped padded batches of --batch-size)
    batch_tokens: int | None = None  # packed: tokens per optimizer step, all processes (None: as many steps as padded)
    blr: float = 9e-3  # base lr: lr = blr * examples per step / 256 (as the paper; packed: the mean per step)
    lr: float | None = None  # absolute lr overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.02
    warmup_epochs: float = 2.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    clip_grad: float | None = 1.0
    max_len: int | None = None  # tokens per example, longer ones are cut (None: the model's context)
    val_fraction: float = 0.05
    max_val_examples: int = 200
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1  # refresh the progress bar's loss / lr / tokens-per-second every N steps
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    weights: str | None = None  # q8 | q4 | q4_0 | auto: pack the frozen base to save memory (default: float, faster)
    device: str = "cpu"  # cpu | cuda (each process then uses cuda:LOCAL_RANK)
    devices: int | None = None  # processes, one per device: spawns them, or checks what torchrun started
    strategy: str = "ddp"  # ddp: frozen base replicated | fsdp: frozen base sharded (FSDP2); see distributed.py
    dist_timeout_s: float = 600.0  # a collective that waits longer fails the run (a rank crashed or hangs)
    resume: bool = False
    overwrite: bool = False  # start afresh in an --out that holds an adapter or a run (deletes its checkpoints)
    image_encoder: str | None = None  # multimodal: image JSONL data, a frozen encoder, a trainable projection
    image_encoder_weights: str | None = None  # local encoder checkpoint (None: the encoder's packaged weights)
    feature_cache: str | None = None  # folder caching encoder features by image hash (default OUT/feature_cache)
    val_data: str | None = None  # held-out data file(s), comma-separated (default: val_fraction of --data)
    extra: dict[str, Any] = field(default_factory=dict)

    def adapter_config(self, n_layers: int, **visual: Any) -> AdapterConfig:
        """The adapter these options describe on a base of `n_layers` layers; `visual` are the
        fields the image encoder decides (multimodal.visual_config)."""
        opts = {name: getattr(self, name) for name in ADAPTER_OPTIONS}
        if self.adapter_layers is None:
            opts["adapter_layers"] = min(DEFAULT_ADAPTER_LAYERS, n_layers)
        return AdapterConfig(**opts, **visual)

    def validate(self, world_size: int = 1, *, main: bool = True) -> None:
        """Every option, before any process group, model or data: the options themselves, then
        the data files and (`main`: the process that writes) the run folder."""
        self.check_options(world_size)
        for path in split_paths(self.data):
            check_data_file(path, "--data")
        for path in split_paths(self.val_data) if self.val_data else []:
            check_data_file(path, "--val-data")
        if self.image_encoder_weights and not Path(self.image_encoder_weights).is_file():
            raise FileNotFoundError(f"--image-encoder-weights {self.image_encoder_weights} not found")
        if main:
            check_run_folder(Path(self.out), resume=self.resume, overwrite=self.overwrite)

    def check_options(self, world_size: int = 1) -> None:
        """The options alone (no file is touched); each message names the flag to change."""
        _check_bounds(self)
        _check_choices(self)
        check_distributed_options(self.devices, self.strategy, self.device, self.dist_timeout_s)
        resolve_grad_accum(self, world_size)
        self._check_adapter_options()

    def _check_adapter_options(self) -> None:
        if not self.image_encoder:
            for name in ("feature_cache", "image_encoder_weights"):
                if getattr(self, name):
                    raise ValueError(f"{_flag(name)} needs images, but no --image-encoder is set; drop {_flag(name)}")
        # Stand-ins for what only the loaded base and encoder know; AdaptedLLaMA checks the real ones.
        layers = self.adapter_layers or DEFAULT_ADAPTER_LAYERS
        visual: dict[str, Any] = {}
        if self.image_encoder:
            visual = {"visual_dim": 1, "image_encoder": self.image_encoder}
            if self.visual_query_blocks:
                visual.update(visual_tokens=1, visual_token_dim=1)
        with flag_names():
            self.adapter_config(layers, **visual).validate(Config(name="stand-in", n_layers=layers))


# The lowest value each numeric option takes (inclusive unless marked), and what the value means;
# None means "off" or "derived" for the options that allow it and is not checked.
_BOUNDS: dict[str, tuple[float, bool, str]] = {
    "adapter_layers": (1, True, "leave it out for min(30, the model's layers)"),
    "epochs": (0, False, "passes over the training set"),
    "max_steps": (1, True, "optimizer steps to run; leave it out to train --epochs"),
    "schedule_steps": (1, True, "optimizer steps the warm-up + cosine schedule spans"),
    "batch_size": (1, True, "examples per device per micro-step"),
    "grad_accum": (1, True, "micro-steps per optimizer step"),
    "global_batch": (1, True, "examples per optimizer step over all processes"),
    "batch_tokens": (1, True, "tokens per optimizer step over all processes (packed batches)"),
    "blr": (0, False, "base learning rate, scaled by global batch / 256"),
    "lr": (0, False, "peak learning rate; leave it out to derive it from --blr"),
    "min_lr": (0, True, "learning rate at the end of the cosine"),
    "weight_decay": (0, True, "AdamW weight decay"),
    "warmup_epochs": (0, True, "epochs of linear warm-up"),
    "warmup_steps": (0, True, "optimizer steps of linear warm-up"),
    "clip_grad": (0, True, "gradient-norm clip; 0 turns it off"),
    "max_len": (2, True, "tokens per example: a prompt token and a response token at least"),
    "max_val_examples": (0, True, "held-out examples evaluated"),
    "eval_every": (1, True, "optimizer steps between held-out evaluations"),
    "save_every": (1, True, "optimizer steps between checkpoints"),
    "log_every": (1, True, "optimizer steps between progress updates"),
}


def _check_bounds(args: TrainArgs) -> None:
    for name, (low, inclusive, meaning) in _BOUNDS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(name)} {value}: must be a finite number ({meaning})")
        if value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ValueError(f"{_flag(name)} {value}: must be {bound} ({meaning})")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1) (the share of --data held out)")


def _check_choices(args: TrainArgs) -> None:
    if args.precision not in PRECISIONS:
        raise ValueError(f"--precision {args.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if args.weights is not None and args.weights not in WEIGHTS:
        raise ValueError(f"--weights {args.weights!r}: choose one of {', '.join(WEIGHTS)}")
    if args.template not in (None, "auto", *TEMPLATES):
        raise ValueError(f"--template {args.template!r}: choose auto or one of {', '.join(TEMPLATES)}")
    if args.image_encoder is not None and args.image_encoder not in ENCODER_NAMES:
        raise ValueError(f"--image-encoder {args.image_encoder!r}: choose one of {', '.join(ENCODER_NAMES)}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r}: use cpu, cuda or cuda:N") from None
    if args.batch_tokens is not None and not args.pack:
        raise ValueError("--batch-tokens sets the size of packed steps; drop it or drop --no-pack")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it; give one of them")


def resolve_grad_accum(args: TrainArgs, world_size: int) -> int:
    """Micro-batches per process per step; `global_batch`, when set, decides it for any world size."""
    if args.global_batch is None:
        return args.grad_accum
    per = args.batch_size * world_size
    if args.global_batch % per:
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_OPTION_NAME = re.compile(r"\b(" + "|".join(ADAPTER_OPTIONS) + r")\b")


@contextmanager
def flag_names() -> Iterator[None]:
    """Rewrites AdapterConfig's errors in the words of the command line (`adapter_len=0` ->
    `--adapter-len=0`), so the message names the flag to change."""
    try:
        yield
    except ValueError as e:
        text = _OPTION_NAME.sub(lambda m: _flag(m.group(1)), str(e))
        if text == str(e):
            raise
        raise ValueError(text) from None
