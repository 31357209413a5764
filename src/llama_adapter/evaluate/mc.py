"""Multiple-choice scoring. Every question is shown with the paper's ScienceQA prompt (`mc_body` +
`ANSWER_PREFIX`):

    Question: <question>
    Context: <context or N/A>
    Options: (A) <choice> (B) <choice> ...
    Answer: The answer is

and scored either by `loglik` (the log-probability of each option's continuation, " A" or " <choice
text>", summed or divided by its token count; every option of a question sits in the same batch;
single-token continuations share one row) or by `generate` (greedy decoding through the engine,
then `parse_answer`).

Images reach the model through `prompts(images)`, a function returning the batch's prompt state
(`Stack.batch_prompt` in the runner), so every adapter variant (V1 global feature, V2 early
fusion, visual-query blocks) is scored the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..adapter import PromptState, stack_prompts
from ..loading import image_prompt_state
from ..tokenizer import alpaca_prompt, render_chat
from .items import bar
from .mc_data import LETTERS, MCItem
from .model_io import Prompts, greedy_answers, prompt_ids, token_logprobs

ANSWER_PREFIX = "The answer is"


# ----------------------------------------------------------------------------------------------- prompts
def mc_body(item: MCItem) -> str:
    """The paper's ScienceQA question-context-options block (without the answer line)."""
    opts = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item.choices))
    return f"Question: {item.question}\nContext: {item.context or 'N/A'}\nOptions: {opts}\n"


def mc_prompt(item: MCItem, template: str = "plain") -> str:
    """Full prompt text ending in 'The answer is'. `plain`: the paper's format ('Answer: The answer is');
    `alpaca` / `chatml`: the block as the user turn, the answer prefix as the start of the response."""
    body = mc_body(item)
    if template == "plain":
        return body + "Answer: " + ANSWER_PREFIX
    if template == "alpaca":
        return alpaca_prompt(body.rstrip("\n")) + ANSWER_PREFIX
    return render_chat([{"role": "user", "content": body.rstrip("\n")}], template, add_generation_prompt=True) + (
        ANSWER_PREFIX
    )


def continuations(item: MCItem, target: str) -> list[str]:
    if target == "letter":
        return [f" {LETTERS[i]}" for i in range(len(item.choices))]
    if target == "text":
        return [f" {c}" for c in item.choices]
    raise ValueError(f"target={target!r}: choose 'letter' or 'text'")


_ANSWER_IS = re.compile(r"answer is\s*:?\s*\(?([A-Z])\b\)?")
_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[).:,\s]|$)")


def parse_answer(text: str, choices: Sequence[str]) -> int | None:
    """The option a generated answer names: 'The answer is (B)', ' B.', '(B) text', or else the one
    choice text that occurs (the earliest if several); None if nothing matches."""
    n = len(choices)
    for rx in (_LEADING, _ANSWER_IS):
        m = rx.search(text)
        if m and LETTERS.index(m.group(1)) < n:
            return LETTERS.index(m.group(1))
    low = text.lower()
    hits = []
    for i, c in enumerate(choices):
        m = re.search(r"(?<!\w)" + re.escape(c.lower()) + r"(?!\w)", low)
        if m:
            hits.append((m.start(), -len(c), i))
    return min(hits)[2] if hits else None


# ----------------------------------------------------------------------------------------------- scoring
def _layout(
    questions: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
) -> tuple[list[list[int]], list[int], list[list[tuple[int, int, list[int]]]]]:
    """Rows to run (token ids), the question of each row, and per question, per option, (row, first
    scored position, option tokens). Single-token options after the same prompt share a row."""
    rows: list[list[int]] = []
    row_q: list[int] = []
    spans: list[list[tuple[int, int, list[int]]]] = []
    for q, pairs in enumerate(questions):
        if any(len(o) == 0 for _, o in pairs):
            raise ValueError("an option encodes to zero tokens; give every choice some text")
        if any(len(p) == 0 for p, _ in pairs):
            raise ValueError("an empty prompt cannot be scored; the tokenizer adds no BOS, so give the question text")
        shared: dict[tuple[int, ...], int] = {}  # prompt -> its row, for single-token options
        sp = []
        for p, o in pairs:
            key = tuple(p)
            if len(o) == 1 and key in shared:
                sp.append((shared[key], len(p) - 1, list(o)))
                continue
            rows.append(list(p) + list(o) if len(o) > 1 else list(p))
            row_q.append(q)
            if len(o) == 1:
                shared[key] = len(rows) - 1
            sp.append((len(rows) - 1, len(p) - 1, list(o)))
        spans.append(sp)
    return rows, row_q, spans


@torch.no_grad()
def score_batch(
    model: torch.nn.Module,
    questions: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
    pad_id: int,
    make_ctx: Callable[[list[int]], Any] | None = None,
) -> list[list[float]]:
    """Option log-prob sums for several questions in one forward; each question is a list of
    (prompt ids, option ids) pairs (the prompt may differ per option where tokenization merges
    across the boundary, see `split_continuation`).

    Options that are one token after the same prompt share one row holding just that prompt (the
    logits at its last position score them all); every other option gets a row (prompt + option).
    So yes/no or letter questions cost one row, and eight colours of which one ("teal") is two
    tokens cost two rows, not eight. Rows are right-padded; causal attention keeps padding out of
    every scored position. `make_ctx` gets the question index of each row and returns the
    model's ctx (e.g. per-row image prompts).
    """
    rows, row_q, spans = _layout(questions)
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    g_rows, g_pos, targets = [], [], []
    for sp in spans:
        for row, start, toks in sp:
            g_rows += [row] * len(toks)
            g_pos += range(start, start + len(toks))
            targets += toks
    ctx = make_ctx(row_q) if make_ctx is not None else None
    tok_lp = token_logprobs(model, idx, torch.tensor(g_rows), torch.tensor(g_pos), torch.tensor(targets), ctx)
    tok_lp = tok_lp.tolist()
    out, k = [], 0
    for sp in spans:
        scores = []
        for _, _, toks in sp:
            scores.append(sum(tok_lp[k : k + len(toks)]))
            k += len(toks)
        out.append(scores)
    return out


def split_continuation(tok: Any, prompt: str, cont: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) taken from the tokenization of `prompt + cont`, so the
    continuation is tokenized as in running text (encoding ' A' alone adds a SentencePiece dummy
    prefix, for one). Where the text merges across the boundary, the shared prefix is the prompt."""
    full = prompt_ids(tok, prompt + cont)
    p = prompt_ids(tok, prompt)
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    if n == len(full):  # the continuation vanished into the prompt's last token
        n -= 1
    return full[:n], full[n:]


# ----------------------------------------------------------------------------------------------- running
def default_prompts(model: torch.nn.Module) -> Prompts | None:
    """Image prompts from the encoder a multimodal adapter was trained with (packaged weights);
    None for text-only models, whose own prompts apply."""
    if not getattr(getattr(model, "adapter_config", None), "visual_dim", 0):
        return None
    return lambda images: image_prompt_state(model, images)


def _row_ctx(state: PromptState | None) -> Callable[[list[int]], Any] | None:
    """`make_ctx` for `score_batch`: row r gets its question's row of the batch state."""
    if state is None:
        return None
    return lambda row_q: stack_prompts([state.row(q) for q in row_q])


def _score_chunk(model: Any, tok: Any, chunk: list[MCItem], texts: list[str], ctx: Any, opts: dict) -> list[dict]:
    qs = [[split_continuation(tok, t, c) for c in continuations(it, opts["target"])] for it, t in zip(chunk, texts)]
    preds = []
    for it, sc, pairs in zip(chunk, score_batch(model, qs, tok.pad_id, make_ctx=_row_ctx(ctx)), qs):
        final = [v / len(o) for v, (_, o) in zip(sc, pairs)] if opts["norm"] == "mean" else sc
        pred = max(range(len(final)), key=final.__getitem__)
        scores = [round(v, 4) for v in final]
        preds.append({"id": it.id, "answer": it.answer, "pred": pred, "scores": scores, **it.meta})
    return preds


def eval_mc(
    model: torch.nn.Module,
    tok: Any,
    items: Sequence[MCItem],
    *,
    template: str = "plain",
    method: str = "loglik",
    norm: str = "sum",
    target: str = "letter",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = False,
    prompts: Prompts | None = None,
) -> dict[str, Any]:
    """Accuracy over `items`; `batch_size` counts questions per forward (all options of a question
    always share a batch). Returns metrics plus one prediction record per item. `prompts(images)`
    gives the prompt state of a batch of questions (default: `default_prompts(model)`); without
    one, images are not used and every item is scored text-only."""
    if method not in ("loglik", "generate"):
        raise ValueError(f"method={method!r}: choose loglik or generate")
    if norm not in ("sum", "mean"):
        raise ValueError(f"norm={norm!r}: choose sum or mean")
    prompts = prompts or default_prompts(model)
    preds: list[dict[str, Any]] = []
    progress_bar = bar(len(items), f"mc/{method}", progress)
    for s in range(0, len(items), batch_size):
        chunk = list(items[s : s + batch_size])
        texts = [mc_prompt(it, template) for it in chunk]
        ctx = prompts([it.image for it in chunk]) if prompts is not None else None
        if method == "loglik":
            preds += _score_chunk(model, tok, chunk, texts, ctx, {"norm": norm, "target": target})
        else:
            for it, text in zip(chunk, greedy_answers(model, tok, texts, max_new_tokens, ctx)):
                pred = parse_answer(text, it.choices)
                preds.append({"id": it.id, "answer": it.answer, "pred": pred, "output": text, **it.meta})
        progress_bar.update(len(chunk))
    progress_bar.close()
    return summarize_mc(preds, prompts is not None)


def summarize_mc(preds: list[dict[str, Any]], images_used: bool = False) -> dict[str, Any]:
    n = len(preds)
    correct = sum(p["pred"] == p["answer"] for p in preds)
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for p in preds:
        for key in ("subject", "context", "grade", "kind", "category"):
            if key in p:
                g = groups[key][p[key]]
                g[0] += p["pred"] == p["answer"]
                g[1] += 1
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else float("nan"),
        "unparsed": sum(p["pred"] is None for p in preds),
        "chance": sum(1 / len(p["scores"]) for p in preds) / n if n and "scores" in preds[0] else None,
        "groups": {
            k: {g: {"n": v[1], "accuracy": v[0] / v[1]} for g, v in sorted(d.items())} for k, d in groups.items()
        },
        "images_used": images_used,
        "predictions": preds,
    }
