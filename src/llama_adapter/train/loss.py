"""The training objective: cross-entropy on response tokens, with the output projection computed only
where a label exists (on instruction data the prompt and padding are often half the batch, and the
projection to a large vocabulary is one of the most expensive matrices).

Losses are returned as sums with their token counts, so micro-batches, processes and evaluation
batches add up to the mean over every response token of a global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import AdaptedLLaMA
from ..data import IGNORE_INDEX


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
    keep = targets != IGNORE_INDEX
    logits = lm_head(model)(h[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def autocast(precision: str, device: str) -> torch.autocast:
    """Mixed precision for the forward: fp32 (off), bf16 or fp16 on `device`'s type."""
    if precision == "fp32":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision={precision!r}: choose fp32, bf16 or fp16")
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    precision: str = "fp32",
    device: str = "cpu",
    make_ctx: Callable[[dict], Any] | None = None,
) -> tuple[float, int]:
    """Summed response-token loss and token count over `batches` (sums add up across ranks)."""
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


def evaluate_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> float:
    """Mean response-token loss over `batches` (the arguments of `evaluate_sums`)."""
    total, n = evaluate_sums(model, batches, *args, **kwargs)
    return total / max(n, 1)
