"""Held-out loss and perplexity on instruction data, computed as training computes its loss: the
mean cross-entropy of the response tokens (prompt and padding masked), encoded by `data.py`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data import IGNORE_INDEX, InstructionDataset, batch_indices, collate
from .items import bar
from .model_io import token_logprobs


@torch.no_grad()
def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed negative log-likelihood of the batch's response tokens and their count."""
    targets = batch["labels"][:, 1:]
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    if not len(rows):
        return 0.0, 0
    lp = token_logprobs(model, batch["input_ids"], rows, pos, targets[rows, pos])
    return -float(lp.sum()), len(rows)


def eval_loss(
    model: torch.nn.Module,
    tok: Any,
    examples: Sequence[dict],
    *,
    template: str,
    max_len: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean response-token loss and perplexity = exp(loss)."""
    ds = InstructionDataset(examples, tok, template, max_len)
    batches = batch_indices(ds.lengths, batch_size, shuffle=False)
    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    progress_bar = bar(len(batches), "loss", progress)
    for b in batches:
        t, k = response_nll(model, collate([ds[i] for i in b], tok.pad_id))
        total, n = total + t, n + k
        progress_bar.update(1)
    progress_bar.close()
    model.train(was_training)
    loss = total / max(n, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if n else float("nan"),
        "n_examples": len(ds),
        "n_tokens": n,
        "n_truncated": ds.n_truncated,
        "n_dropped": ds.n_dropped,
    }
