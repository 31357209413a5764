"""Evaluation: held-out loss / perplexity on instruction data, and multiple-choice accuracy.

Multiple choice (`MCItem`: question, choices, answer index, optional context and image) comes from
- ScienceQA (`load_scienceqa`): `problems.json` + `pid_splits.json`, one split; images (optional) at
  `IMAGES/<split>/<pid>/<image>` as in the official release;
- easy-VQA (`load_easyvqa`): the `easy-vqa==1.0` pip package's questions with their image files; the
  candidates are either the package's whole answer vocabulary (13) or the answers of the question's
  kind (yes/no, shape, colour; the kind is the group holding the gold answer, which the question's
  wording already gives away: "does the image contain...", "what shape...", "what color...");
- any JSONL of `{"question", "choices", "answer"}` (`load_mc_jsonl`): answer = 0-based index, a
  letter, or the text of a choice; optional `context`, `image` (relative to the file), `id`.

Every question is shown with the paper's ScienceQA prompt (`mc_body` + `ANSWER_PREFIX`):

    Question: <question>
    Context: <context or N/A>
    Options: (A) <choice> (B) <choice> ...
    Answer: The answer is

and scored either by `loglik` (the log-probability of each option's continuation, " A" or " <choice
text>", summed or divided by its token count; every option of a question sits in the same batch;
single-token continuations share one row) or by `generate` (greedy decoding, then `parse_answer`).

Bad items (answer index out of range, empty choices, an image missing on disk, ...) raise a
`ValueError` naming the file and line (or ScienceQA pid); with `skip_bad=True` they are skipped,
and every skipped item is counted and listed in the report.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate import SamplingParams, generate_text
from .loading import encoder_weights, load_stack, resolve_template

log = logging.getLogger("llama_adapter.evaluate")

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_PREFIX = "The answer is"
FORMATS = ("alpaca", "scienceqa", "easyvqa", "jsonl")
EASYVQA_KINDS = {"yes/no": ("yes", "no"), "shape": ("circle", "rectangle", "triangle")}  # the rest: colour


# ------------------------------------------------------------------------------------------------ items
@dataclass
class MCItem:
    id: str
    question: str
    choices: list[str]
    answer: int
    context: str = ""
    image: str | None = None
    meta: dict[str, str] = field(default_factory=dict)  # groups for the per-group accuracy table


@dataclass
class MCData:
    items: list[MCItem]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"where", "reason"}
    notes: list[str] = field(default_factory=list)


class _Bad(Exception):
    pass


def _check_choices(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise _Bad("'choices' is empty or not a list; give at least two answer options")
    if len(choices) < 2:
        raise _Bad(f"only one choice {choices!r}; a multiple-choice question needs at least two")
    if len(choices) > len(LETTERS):
        raise _Bad(f"{len(choices)} choices; at most {len(LETTERS)} can be lettered A-Z")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise _Bad(f"every choice must be a non-empty string, got {choices!r}")
    return [c.strip() for c in choices]


def _answer_index(answer: Any, choices: list[str]) -> int:
    """0-based index from an int index, the exact text of a choice, or a letter."""
    if isinstance(answer, bool) or answer is None:
        raise _Bad(f"'answer' must be an index, a letter or a choice's text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise _Bad(
                f"answer index {answer} out of range for {len(choices)} choices (0-based: 0..{len(choices) - 1})"
            )
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if a in choices:
            return choices.index(a)
        m = re.fullmatch(r"\(?([A-Za-z])\)?", a)
        if m:
            i = LETTERS.index(m.group(1).upper())
            if i >= len(choices):
                raise _Bad(
                    f"answer letter {a!r} out of range for {len(choices)} choices (A..{LETTERS[len(choices) - 1]})"
                )
            return i
        raise _Bad(f"answer {answer!r} is neither a letter nor the text of one of the choices {choices!r}")
    raise _Bad(f"'answer' must be an index, a letter or a choice's text, got {type(answer).__name__}")


def _resolve_image(img: Any, root: Path, where_root: str) -> str | None:
    if img in (None, ""):
        return None
    if not isinstance(img, str):
        raise _Bad(f"'image' must be a path string or null, got {img!r}")
    p = Path(img)
    if not p.is_absolute():
        p = root / p
    if not p.is_file():
        raise _Bad(f"image {p} not found on disk ({where_root})")
    return str(p)


def _collect(where: str, skip_bad: bool, data: MCData, make: Callable[[], MCItem]) -> None:
    try:
        data.items.append(make())
    except _Bad as e:
        if not skip_bad:
            raise ValueError(f"{where}: {e}; fix the item or pass --skip-bad to skip and count such items") from None
        data.skipped.append({"where": where, "reason": str(e)})


def load_mc_jsonl(
    path: str | Path, *, images: str | Path | None = None, skip_bad: bool = False, limit: int | None = None
) -> MCData:
    """JSONL of {question, choices, answer[, context, image, id]}; image paths relative to `images`
    (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    root = Path(images) if images else path.parent
    data = MCData([])
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(data.items) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"

            def make(line: str = line, lineno: int = lineno) -> MCItem:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(f"invalid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict):
                    raise _Bad(f"expected a JSON object, got {type(row).__name__}")
                q = row.get("question")
                if not isinstance(q, str) or not q.strip():
                    raise _Bad("missing or empty 'question'")
                if "choices" not in row:
                    raise _Bad("missing 'choices'")
                choices = _check_choices(row["choices"])
                if "answer" not in row:
                    raise _Bad("missing 'answer'")
                ans = _answer_index(row["answer"], choices)
                ctx = row.get("context") or ""
                if not isinstance(ctx, str):
                    raise _Bad(f"'context' must be a string, got {type(ctx).__name__}")
                img = _resolve_image(row.get("image"), root, f"relative paths are relative to {root}")
                meta = {k: str(row[k]) for k in ("subject", "category") if k in row}
                return MCItem(str(row.get("id", lineno)), q.strip(), choices, ans, ctx.strip(), img, meta)

            _collect(where, skip_bad, data, make)
    if not data.items and not data.skipped:
        raise ValueError(f"{path}: no questions; each line must be a {{question, choices, answer}} object")
    return data


def _sqa_paths(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        problems, splits = path / "problems.json", path / "pid_splits.json"
    else:
        problems, splits = path, path.parent / "pid_splits.json"
    for p in (problems, splits):
        if not p.is_file():
            raise FileNotFoundError(
                f"ScienceQA file {p} not found; point --data at the folder holding problems.json and pid_splits.json"
            )
    return problems, splits


def load_scienceqa(
    path: str | Path,
    split: str = "val",
    *,
    images: str | Path | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> MCData:
    """ScienceQA `problems.json` (+ `pid_splits.json` next to it) -> the questions of `split` in
    pid_splits order. With `images` (the release's `images/` folder) image questions get
    `IMAGES/<split>/<pid>/<image>`; without it they are evaluated text-only (noted in the report)."""
    problems_path, splits_path = _sqa_paths(Path(path))
    try:
        problems = json.loads(problems_path.read_text(encoding="utf-8"))
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON in ScienceQA files ({e}); re-download problems.json / pid_splits.json") from e
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{problems_path} and {splits_path} must each hold a JSON object keyed by pid / split")
    if split not in splits:
        raise ValueError(f"{splits_path} has no split {split!r}; choose one of: {', '.join(splits)}")
    data = MCData([])
    n_images_ignored = 0
    for pid in splits[split]:
        if limit is not None and len(data.items) >= limit:
            break
        pid = str(pid)
        where = f"{problems_path}: pid {pid}"

        def make(pid: str = pid) -> MCItem:
            nonlocal n_images_ignored
            if pid not in problems:
                raise _Bad(f"listed in {splits_path.name}[{split!r}] but not in {problems_path.name}")
            p = problems[pid]
            q = p.get("question")
            if not isinstance(q, str) or not q.strip():
                raise _Bad("missing or empty 'question'")
            choices = _check_choices(p.get("choices"))
            if not isinstance(p.get("answer"), int):
                raise _Bad(f"'answer' must be a 0-based index, got {p.get('answer')!r}")
            ans = _answer_index(p["answer"], choices)
            img = None
            if p.get("image"):
                if images is None:
                    n_images_ignored += 1
                else:
                    folder = Path(images) / str(p.get("split") or split) / pid
                    img = _resolve_image(p["image"], folder, f"expected IMAGES/<split>/<pid>/{p['image']}")
            hint = (p.get("hint") or "").strip()
            modality = "IMG" if p.get("image") else ("TXT" if hint else "NO")
            grade = str(p.get("grade") or "")
            g = int(grade[5:]) if grade.startswith("grade") and grade[5:].isdigit() else None
            meta = {"subject": str(p.get("subject") or "?"), "context": modality}
            if g is not None:
                meta["grade"] = "G1-6" if g <= 6 else "G7-12"
            return MCItem(pid, q.strip(), choices, ans, hint, img, meta)

        _collect(where, skip_bad, data, make)
    if n_images_ignored:
        data.notes.append(
            f"{n_images_ignored} questions have an image that was not used (no --images folder): evaluated text-only"
        )
    return data


def easyvqa_kind(answer: str) -> str:
    for kind, answers in EASYVQA_KINDS.items():
        if answer in answers:
            return kind
    return "color"


def load_easyvqa(split: str = "test", *, candidates: str = "kind", limit: int | None = None) -> MCData:
    """easy-VQA questions as image multiple choice (see the module docstring for `candidates`)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise ValueError("easy-VQA comes from a pip package: `pip install easy-vqa==1.0`") from e
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split {split!r}: choose train or test")
    if candidates not in ("all", "kind"):
        raise ValueError(
            f"candidates={candidates!r}: choose 'all' (13 answers) or 'kind' (answers of the question's kind)"
        )
    qs, ans, ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    vocab = list(easy_vqa.get_answers())
    data = MCData([])
    for n, (q, a, i) in enumerate(zip(qs, ans, ids)):
        if limit is not None and n >= limit:
            break
        kind = easyvqa_kind(a)
        if candidates == "all":
            choices = vocab
        else:
            choices = [v for v in vocab if easyvqa_kind(v) == kind]
        data.items.append(
            MCItem(
                f"{split}-{n}",
                q[:1].upper() + q[1:],
                list(choices),
                choices.index(a),
                "",
                str(paths[i]),
                {"kind": kind},
            )
        )
    data.notes.append(
        f"easy-VQA {split}: candidates={candidates} ({'13 answers' if candidates == 'all' else 'per kind'})"
    )
    return data


def load_mc(fmt: str, data: str | Path | None, **kw: Any) -> MCData:
    split = kw.pop("split", None)
    candidates = kw.pop("candidates", "kind")
    if fmt == "scienceqa":
        return load_scienceqa(_need(data, fmt), split or "val", **kw)
    if fmt == "easyvqa":
        return load_easyvqa(split or "test", candidates=candidates, limit=kw.get("limit"))
    if fmt == "jsonl":
        return load_mc_jsonl(_need(data, fmt), **kw)
    raise ValueError(f"--format {fmt} is not a multiple-choice format; use scienceqa, easyvqa or jsonl with --task mc")


def _need(data: str | Path | None, fmt: str) -> str | Path:
    if not data:
        raise ValueError(f"--format {fmt} needs --data")
    return data


# ----------------------------------------------------------------------------------------------- prompts
def mc_body(item: MCItem) -> str:
    """The paper's ScienceQA question-context-options block (without the answer line)."""
    opts = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(item.choices))
    return f"Question: {item.question}\nContext: {item.context or 'N/A'}\nOptions: {opts}\n"


def mc_prompt(item: MCItem, template: str = "plain") -> str:
    """Full prompt text ending in 'The answer is'. `plain`: the paper's format ('Answer: The answer is');
    `alpaca` / `chatml`: the block as the user turn, the answer prefix as the start of the response."""
    from .tokenizer import alpaca_prompt, render_chat

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
def _lm_head(model: torch.nn.Module) -> torch.nn.Module:
    from .train import lm_head

    return lm_head(model)


def _prompt_ids(tok: Any, text: str) -> list[int]:
    ids = tok.encode(text)
    if tok.add_bos and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    return ids


@torch.no_grad()
def score_options(
    model: torch.nn.Module, prompt_ids: Sequence[int], option_ids: Sequence[Sequence[int]], pad_id: int = 0
) -> list[float]:
    """Summed log-probabilities of each option's tokens after the prompt, for ONE question: one batch
    holding every option (one row in all when every option is a single token)."""
    return score_batch(model, [[(list(prompt_ids), list(o)) for o in option_ids]], pad_id)[0]


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
    rows: list[list[int]] = []
    row_q: list[int] = []
    spans: list[list[tuple[int, int, list[int]]]] = []  # per question, per option: (row, first pos, tokens)
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
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    dev = next(model.parameters()).device
    kwargs: dict[str, Any] = {"hidden_only": True}
    if make_ctx is not None:
        kwargs["ctx"] = make_ctx(row_q)
    h = model(idx.to(dev), **kwargs)
    # Project only the positions that predict option tokens (the vocabulary matrix is the big one).
    g_rows, g_pos, targets = [], [], []
    for sp in spans:
        for row, start, toks in sp:
            g_rows += [row] * len(toks)
            g_pos += range(start, start + len(toks))
            targets += toks
    hs = h[torch.tensor(g_rows, device=dev), torch.tensor(g_pos, device=dev)]
    logp = torch.log_softmax(_lm_head(model)(hs).float(), dim=-1)
    tok_lp = logp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)].tolist()
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
    full = _prompt_ids(tok, prompt + cont)
    p = _prompt_ids(tok, prompt)
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    if n == len(full):  # the continuation vanished into the prompt's last token
        n -= 1
    return full[:n], full[n:]


# ----------------------------------------------------------------------------------------------- running
@dataclass
class EvalArgs:
    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    task: str = "mc"  # loss | mc
    data: str | None = None
    format: str | None = None  # alpaca | scienceqa | easyvqa | jsonl; None: guessed from --task / --data
    split: str | None = None  # scienceqa: val (default) / test / ...; easyvqa: test (default) / train
    images: str | None = None  # scienceqa: the release's images/ folder; jsonl: root for relative paths
    method: str = "loglik"  # loglik | generate
    norm: str = "sum"  # sum | mean (log-prob divided by the option's token count)
    target: str = "letter"  # letter: score " A", " B"...; text: score " <choice text>"
    candidates: str = "kind"  # easyvqa: kind | all
    template: str = "auto"  # auto | plain | alpaca | chatml
    limit: int | None = None
    batch_size: int = 8
    max_len: int = 512  # loss task: tokens per example (longer ones are cut, as in training)
    max_new_tokens: int = 8
    skip_bad: bool = False
    report: str | None = None
    dtype: str = "float32"
    progress: bool = True
    image_encoder_weights: str | None = None  # None: the path the adapter recorded at training, if any


def guess_format(args: EvalArgs) -> str:
    if args.format:
        if args.format not in FORMATS:
            raise ValueError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
        return args.format
    if args.task == "loss":
        return "alpaca"
    d = Path(args.data) if args.data else None
    if d is None:
        return "easyvqa"
    if d.is_dir() or d.name == "problems.json":
        return "scienceqa"
    return "jsonl"


def load_for_eval(spec: str, adapter: str | None, dtype: str = "float32") -> tuple[Any, Any, dict | None]:
    """(model, tokenizer, adapter metadata or None) through the one loader."""
    stack = load_stack(spec, adapter, dtype=dtype)
    a = next(iter(stack.adapters.values()), None)
    return stack.only(), stack.tokenizer, None if a is None else a.meta


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not enabled)


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    tok: Any,
    examples: Sequence[dict],
    *,
    template: str,
    max_len: int = 512,
    batch_size: int = 8,
    make_ctx: Callable[[dict], Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean response-token loss (train.py's `token_loss_sum`) and perplexity = exp(loss)."""
    from .data import InstructionDataset, batch_indices, collate
    from .train import evaluate_sums

    ds = InstructionDataset(examples, tok, template, max_len)
    batches = batch_indices(ds.lengths, batch_size, shuffle=False)
    total, n = 0.0, 0
    bar = _bar(len(batches), "loss", progress)
    for b in batches:
        t, k = evaluate_sums(model, [collate([ds[i] for i in b], tok.pad_id)], make_ctx=make_ctx)
        total, n = total + t, n + k
        bar.update(1)
    bar.close()
    loss = total / max(n, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if n else float("nan"),
        "n_examples": len(ds),
        "n_tokens": n,
        "n_truncated": ds.n_truncated,
        "n_dropped": ds.n_dropped,
    }


def _image_ctx(model: Any, items: Sequence[MCItem], weights: str | None = None) -> Callable[[list[int]], Any] | None:
    """Per-row image prompts for a multimodal adapter; None for text-only models. `weights`: the
    image encoder checkpoint (None: the encoder's packaged weights)."""
    cfg = getattr(model, "adapter_config", None)
    if cfg is None or not cfg.visual_dim:
        return None
    from .multimodal import image_features_for

    # Each distinct image once: VQA sets ask several questions about the same picture.
    unique = list(dict.fromkeys(it.image for it in items if it.image))
    feats = image_features_for(model, unique, weights=weights).cpu() if unique else None
    where = {path: k for k, path in enumerate(unique)}
    rows = torch.zeros(len(items), cfg.visual_dim)
    has = torch.zeros(len(items), dtype=torch.bool)
    for i, it in enumerate(items):
        if it.image:
            rows[i], has[i] = feats[where[it.image]], True
    dev = next(model.parameters()).device

    def make(row_q: list[int]) -> Any:
        sel = torch.tensor(row_q)
        return model.prompt_state(visual=rows[sel].to(dev), has_image=has[sel].to(dev))

    return make


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
    image_encoder_weights: str | None = None,
) -> dict[str, Any]:
    """Accuracy over `items`; `batch_size` counts questions per forward (all options of a question
    always share a batch). Returns metrics plus one prediction record per item. Items with an
    image condition a multimodal adapter on it (encoder checkpoint `image_encoder_weights`, None
    for the encoder's packaged weights); items without one are scored text-only."""
    if method not in ("loglik", "generate"):
        raise ValueError(f"method={method!r}: choose loglik or generate")
    if norm not in ("sum", "mean"):
        raise ValueError(f"norm={norm!r}: choose sum or mean")
    images_used = getattr(getattr(model, "adapter_config", None), "visual_dim", 0) > 0
    preds: list[dict[str, Any]] = []
    bar = _bar(len(items), f"mc/{method}", progress)
    for s in range(0, len(items), batch_size):
        chunk = list(items[s : s + batch_size])
        texts = [mc_prompt(it, template) for it in chunk]
        make_ctx = _image_ctx(model, chunk, image_encoder_weights) if images_used else None
        if method == "loglik":
            qs = [[split_continuation(tok, t, c) for c in continuations(it, target)] for it, t in zip(chunk, texts)]
            scores = score_batch(model, qs, tok.pad_id, make_ctx=make_ctx)
            for it, sc, pairs in zip(chunk, scores, qs):
                final = [v / len(o) for v, (_, o) in zip(sc, pairs)] if norm == "mean" else sc
                pred = max(range(len(final)), key=final.__getitem__)
                preds.append(
                    {"id": it.id, "answer": it.answer, "pred": pred, "scores": [round(v, 4) for v in final], **it.meta}
                )
        else:
            outs = _generate(model, tok, texts, max_new_tokens, make_ctx)
            for it, text in zip(chunk, outs):
                pred = parse_answer(text, it.choices)
                preds.append({"id": it.id, "answer": it.answer, "pred": pred, "output": text, **it.meta})
        bar.update(len(chunk))
    bar.close()
    return summarize_mc(preds, images_used)


def _generate(model: Any, tok: Any, texts: list[str], max_new_tokens: int, make_ctx: Any) -> list[str]:
    ctx = None
    if make_ctx is not None:
        ctx = make_ctx(list(range(len(texts))))
    elif hasattr(model, "prompt_state"):
        ctx = model.prompt_state(precompute=True)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    return generate_text(model, tok, texts, params, ctx=ctx)


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


def run(args: EvalArgs, model: Any = None, tok: Any = None, adapter_meta: dict | None = None) -> dict[str, Any]:
    """Everything `llama-adapter evaluate` does except printing; returns the report."""
    if args.task not in ("loss", "mc"):
        raise ValueError(f"--task {args.task!r}: choose loss or mc")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    fmt = guess_format(args)
    if args.task == "loss" and fmt != "alpaca":
        raise ValueError(
            f"--task loss reads instruction data (--format alpaca: Alpaca JSON/JSONL or chat JSONL), "
            f"not {fmt}; use --task mc for multiple choice"
        )
    if args.task == "mc" and fmt == "alpaca":
        raise ValueError("--task mc needs --format scienceqa, easyvqa or jsonl")
    # Validate the data before spending time on the model.
    mc = None
    if args.task == "mc":
        kw: dict[str, Any] = {"limit": args.limit, "split": args.split, "candidates": args.candidates}
        if fmt != "easyvqa":
            kw.update(images=args.images, skip_bad=args.skip_bad)
        mc = load_mc(fmt, args.data, **kw)
    else:
        from .data import load_examples

        examples = load_examples(_need(args.data, "alpaca"))[: args.limit]
    if model is None:
        model, tok, adapter_meta = load_for_eval(args.model, args.adapter, args.dtype)
    template = resolve_template(args.template, tok, adapter_meta, "instruct" if args.task == "loss" else "complete")
    weights = None
    if args.task == "mc" and getattr(getattr(model, "adapter_config", None), "visual_dim", 0):
        # The checkpoint the adapter was trained with (recorded by finetune), unless overridden.
        weights = encoder_weights(args.adapter, adapter_meta, args.image_encoder_weights)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "task": args.task,
        "format": fmt,
        "model": args.model,
        "adapter": args.adapter,
        "data": args.data,
        "split": args.split,
        "template": template,
    }
    if args.task == "loss":
        report.update(
            eval_loss(
                model,
                tok,
                examples,
                template=template,
                max_len=args.max_len,
                batch_size=args.batch_size,
                progress=args.progress,
            )
        )
    else:
        assert mc is not None
        if not mc.items:
            raise ValueError(f"every item was skipped as bad ({len(mc.skipped)}); nothing to evaluate")
        report.update(
            {
                "method": args.method,
                "norm": args.norm if args.method == "loglik" else None,
                "target": args.target if args.method == "loglik" else None,
            }
        )
        res = eval_mc(
            model,
            tok,
            mc.items,
            template=template,
            method=args.method,
            norm=args.norm,
            target=args.target,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=args.progress,
            image_encoder_weights=weights,
        )
        if any(it.image for it in mc.items) and not res["images_used"]:
            mc.notes.append("items have images but the model has no image adapter: evaluated text-only")
        report.update(res)
        report["n_skipped"] = len(mc.skipped)
        report["skipped"] = mc.skipped
        report["notes"] = mc.notes
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["args"] = asdict(args)
    if args.report:
        p = Path(args.report)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2, default=str))
    return report


def format_table(report: dict[str, Any]) -> str:
    """A one-screen summary of a report."""
    lines = [
        f"{report['task']} | {report['format']} | model {report['model']}"
        + (f" + adapter {report['adapter']}" if report.get("adapter") else "")
        + f" | template {report['template']}"
    ]
    if report["task"] == "loss":
        lines += [
            f"{'examples':<12}{report['n_examples']:>10}",
            f"{'tokens':<12}{report['n_tokens']:>10}",
            f"{'loss':<12}{report['loss']:>10.4f}",
            f"{'perplexity':<12}{report['perplexity']:>10.3f}",
        ]
        if report["n_truncated"] or report["n_dropped"]:
            lines.append(f"truncated {report['n_truncated']}, dropped {report['n_dropped']} (raise --max-len)")
        return "\n".join(lines)
    how = report["method"] + (f" ({report['target']}, {report['norm']})" if report["method"] == "loglik" else "")
    lines.append(f"method {how} | images used: {'yes' if report['images_used'] else 'no'}")
    lines.append(f"{'group':<24}{'n':>7}{'accuracy':>10}")
    lines.append(f"{'all':<24}{report['n']:>7}{100 * report['accuracy']:>9.2f}%")
    for key, d in report["groups"].items():
        for g, v in list(d.items())[:8]:
            lines.append(f"{key + '=' + g:<24}{v['n']:>7}{100 * v['accuracy']:>9.2f}%")
    if report.get("chance") is not None:
        lines.append(f"{'chance':<24}{'':>7}{100 * report['chance']:>9.2f}%")
    if report["method"] == "generate":
        lines.append(f"unparsed answers: {report['unparsed']}")
    lines.append(f"skipped bad items: {report['n_skipped']}")
    for s in report["skipped"][:3]:
        lines.append(f"  {s['where']}: {s['reason']}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
