"""Training: a recipe over a few components.

args.py           TrainArgs: every option of a run, checked once before anything loads
schedule.py       global batch or packed token budget, steps, warm-up + cosine learning rate
loss.py           response-token cross-entropy (frozen head in chunks), held-out evaluation
checkpointing.py  step checkpoints (atomic, resumable, disk-full safe), metrics.csv, loss plot
recipe.py         Recipe: setup / step / evaluate / save; `finetune` and `fit`
"""

from .args import ADAPTER_OPTIONS, TrainArgs, resolve_grad_accum
from .checkpointing import Checkpointer, WriteError, plot_losses, read_metrics, write_metrics
from .loss import autocast, batch_to, evaluate_loss, evaluate_sums, head_loss_sum, lm_head, token_loss_sum
from .recipe import FitResult, Recipe, finetune, fit, load_base, load_data, trainable_groups
from .schedule import Schedule, cosine_lr

__all__ = [
    "ADAPTER_OPTIONS",
    "Checkpointer",
    "FitResult",
    "Recipe",
    "Schedule",
    "TrainArgs",
    "WriteError",
    "autocast",
    "batch_to",
    "cosine_lr",
    "evaluate_loss",
    "evaluate_sums",
    "finetune",
    "fit",
    "head_loss_sum",
    "lm_head",
    "load_base",
    "load_data",
    "plot_losses",
    "read_metrics",
    "resolve_grad_accum",
    "token_loss_sum",
    "trainable_groups",
    "write_metrics",
]
