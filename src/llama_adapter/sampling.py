"""How the next token is chosen and how text leaves the model: sampling settings, a per-row sampler
and a stop-string matcher for streamed text. Used by the decode engine (engine.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (top_k/top_p are then irrelevant);
    `repetition_penalty` (CTRL-style, > 1 discourages repeats) applies in both modes.
    `stop` strings are matched on text, so only `generate_text` uses them."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is negative; use 0 or more")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None to disable)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (or None to disable)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


class Sampler:
    """Turns last-position logits [B, V] into next tokens [B], remembering what each row has seen
    (prompt + generated) for the repetition penalty. Seeded through its own `torch.Generator`, so
    a seed reproduces the same tokens whatever else uses the global RNG."""

    def __init__(self, params: SamplingParams, prompts: Sequence[Sequence[int]], vocab_size: int, device: Any) -> None:
        self.p = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for b, ids in enumerate(prompts):
                self.seen[b, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
            self.rows = torch.arange(len(prompts), device=device)

    @property
    def plain_greedy(self) -> bool:
        """argmax with nothing to remember: the engine batches these rows into one op."""
        return self.p.temperature <= 0 and self.seen is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        logits = logits.float()
        if self.seen is not None:
            r = p.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if p.temperature <= 0:
            tok = logits.argmax(-1)
        else:
            tok = self._sample(logits / p.temperature)
        if self.seen is not None:
            self.seen[self.rows, tok] = True
        return tok

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.top_k is not None and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if p.top_p is not None and p.top_p < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[:, 0] = False
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


class StopText:
    """Streams text while holding back any tail that could begin a stop string, and cuts at the
    first complete one, so what it emits never contains any part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Text that is now safe to emit; sets `hit` (and emits nothing more) once a stop matched."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.buf += text
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buf, self.hit = self.buf[: min(found)], "", True
            return out
        hold = 0  # longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out

    def flush(self) -> str:
        """End of text: a held tail that never became a stop string is ordinary text."""
        out, self.buf = ("" if self.hit else self.buf), ""
        return out
