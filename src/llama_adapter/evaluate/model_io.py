"""The two ways evaluation asks a model something:

- `token_logprobs`: log-probabilities of chosen tokens from one forward, behind held-out loss and
  log-likelihood multiple choice (hidden states first, then only the scored positions go through
  the vocabulary matrix, the big one);
- `greedy_answers`: short greedy answers through the decode engine (`generate_text`), batched,
  one prompt state row per question (adapter prompts, with or without an image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapter import AdaptedLLaMA, PromptState
from ..generate import SamplingParams, generate_text

# images (a path, PIL image or None per row) -> that batch's prompt state (`Stack.batch_prompt`)
Prompts = Callable[[list[Any]], PromptState | None]


def output_head(model: nn.Module) -> nn.Module:
    """The vocabulary projection of a base model or an adapted one."""
    return model.model.output if isinstance(model, AdaptedLLaMA) else model.output


def prompt_ids(tok: Any, text: str) -> list[int]:
    """Token ids of `text` with BOS when the tokenizer wants one (as training encodes prompts)."""
    ids = tok.encode(text)
    if tok.add_bos and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    return ids


@torch.no_grad()
def token_logprobs(
    model: nn.Module,
    idx: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    ctx: Any = None,
) -> torch.Tensor:
    """log p(targets[i] | idx[rows[i], :positions[i] + 1]) for every i, from one forward of `idx`
    [B, T]; `ctx` is the model's prompt state (None: an adapter's own prompts)."""
    dev = next(model.parameters()).device
    kwargs: dict[str, Any] = {"hidden_only": True}
    if ctx is not None:
        kwargs["ctx"] = ctx
    h = model(idx.to(dev), **kwargs)
    hs = h[rows.to(dev), positions.to(dev)]
    logp = torch.log_softmax(output_head(model)(hs).float(), dim=-1)
    return logp[torch.arange(len(targets), device=dev), targets.to(dev)]


def greedy_answers(
    model: nn.Module, tok: Any, texts: list[str], max_new_tokens: int, ctx: PromptState | None = None
) -> list[str]:
    """Greedy completions of `texts`, each cut at its first newline (answers are one line); `ctx`
    holds row b's prompt state in row b, or one row for all (None: the model's own prompts)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    return generate_text(model, tok, texts, params, ctx=ctx)
