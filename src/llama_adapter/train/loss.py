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


def batch_to(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`; the rest (a packed batch's `packing`) as it is."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_loss_sum(model: nn.Module, batch: dict[str, Any], ctx: Any = None) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over response tokens, and their count. Projects only those positions.
    A packed batch (`data.collate_packed`) carries its `packing`: each example sees only itself."""
    idx, labels = batch["input_ids"], batch["labels"]
    kwargs: dict[str, Any] = {"hidden_only": True}
    if ctx is not None:
        kwargs["ctx"] = ctx
    if batch.get("packing") is not None:
        kwargs["packing"] = batch["packing"]
    h = model(idx, **kwargs)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return head_loss_sum(lm_head(model), h[:, :-1][keep], targets[keep]), int(keep.sum())


def head_loss_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Summed cross-entropy of head(h) [N, vocab] against targets [N]. A frozen nn.Linear head goes
    through `FrozenHeadCrossEntropy` (a few rows at a time); anything else (a trained head in full
    fine-tuning, a quantized one) through plain autograd."""
    w = getattr(head, "weight", None)
    plain = type(head) is not nn.Linear or head.bias is not None or w is None or not w.is_floating_point()
    if plain or w.requires_grad:
        return F.cross_entropy(head(h).float(), targets, reduction="sum")
    return FrozenHeadCrossEntropy.apply(h, w, targets, chunk)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ W.T, targets)) for a frozen W, `chunk` rows at a time, with dL/dh
    computed in the forward. The [N, vocab] logits, their log-softmax and its gradient (three N x
    vocab fp32 buffers: 0.9 GB for 1,500 response tokens of a 49K vocabulary, the largest tensors of
    an adapter step) never exist; the backward is one multiply of the saved [N, dim] gradient."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s : s + chunk], w).float()
            t = targets[s : s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[s : s + chunk] = (probs.to(w.dtype) @ w).to(h.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


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
    batches: Sequence[dict[str, Any]],
    precision: str = "fp32",
    device: str = "cpu",
    make_ctx: Callable[[dict], Any] | None = None,
) -> tuple[float, int]:
    """Summed response-token loss and token count over `batches` (sums add up across ranks)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b = batch_to(b, device)
        with autocast(precision, device):
            loss, k = token_loss_sum(model, b, make_ctx(b) if make_ctx else None)
        total += loss.item()
        n += k
    model.train(was_training)
    return total, n


def evaluate_loss(model: nn.Module, batches: Sequence[dict[str, Any]], *args: Any, **kwargs: Any) -> float:
    """Mean response-token loss over `batches` (the arguments of `evaluate_sums`)."""
    total, n = evaluate_sums(model, batches, *args, **kwargs)
    return total / max(n, 1)
