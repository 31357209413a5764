"""Instruction data for training: loading, prompt rendering + loss masks, hold-out split, batching.

Accepted files (`load_examples`):
- Alpaca JSON (a list) or JSONL: `{"instruction", "input" (optional), "output"}` per example;
- chat JSONL (or a JSON list): `{"messages": [{"role", "content"}, ...]}` whose last message is the assistant's.
  Every assistant turn carries loss (not only the last one): earlier answers are as much training signal as the
  last, and the prompt/history tokens around them stay masked.

`encode_example` tokenizes the prompt and the response separately and concatenates them, so the boundary
between masked (-100) and trained labels is exact. Labels are aligned with `input_ids` (not shifted): the loss
predicts `labels[t + 1]` from position `t`.
"""

from __future__ import annotations

import heapq
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .model import Packing
from .tokenizer import TEMPLATES, TURN_END, Tokenizer, alpaca_prompt, render_chat

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------------------- loading
def check_data_file(path: str | Path, flag: str = "--data") -> Path:
    """`path` as a Path if it is a file; else an error that says whether it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{flag} {path} is a directory; pass a data file in it (Alpaca JSON/JSONL or chat JSONL), "
            "several as a,b.jsonl"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}; pass an Alpaca JSON/JSONL or chat JSONL file")
    return path


def _check_example(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(
            f"{where}: expected a JSON object with instruction/output or messages, got {type(item).__name__}"
        )
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(
                    f'{where}: message {j} must be {{"role": one of {"/".join(ROLES)}, "content": string}}, got {m!r}'
                )
        if msgs[-1]["role"] != "assistant":
            raise ValueError(
                f"{where}: the last message must be the assistant's answer (the training target); "
                f"got role {msgs[-1]['role']!r}"
            )
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    for key in ("instruction", "output"):
        if key not in item:
            raise ValueError(
                f"{where}: missing {key!r}; each example needs 'instruction' and 'output' "
                "('input' is optional) or a 'messages' list"
            )
        if not isinstance(item[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
    inp = item.get("input") or ""
    if not isinstance(inp, str):
        raise ValueError(f"{where}: 'input' must be a string, got {type(inp).__name__}")
    return {"instruction": item["instruction"], "input": inp, "output": item["output"]}


def load_examples(path: str | Path) -> list[dict]:
    """Read Alpaca JSON/JSONL or chat JSONL; errors name the file and line (JSONL) or item index (JSON list)."""
    path = check_data_file(path)
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":  # one JSON list
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from e
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); fix the file") from e
        examples = [_check_example(it, f"{path}: item {i} (0-based)") for i, it in enumerate(items)]
    else:  # JSONL
        examples = []
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            try:
                s = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (column {e.start + 1}); re-save the file as UTF-8"
                ) from e
            if not s.strip():
                continue
            try:
                item = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); each line of a "
                    "JSONL file must be one complete JSON object"
                ) from e
            examples.append(_check_example(item, f"{path}:{lineno}"))
    if not examples:
        raise ValueError(f"{path}: no examples; the file must hold at least one instruction/output or chat example")
    return examples


def split_paths(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """`--data a.json,b.jsonl` (or a list) -> paths; joint training reads several files as one set."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    paths = [Path(p.strip()) for it in items for p in str(it).split(",") if p.strip()]
    if not paths:
        raise ValueError("no data file given; pass --data FILE (several: --data a.json,b.jsonl)")
    return paths


def file_has_images(path: str | Path) -> bool:
    """Whether any example of a JSON list / JSONL file names an image (an image-text file)."""
    path = check_data_file(path)
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            items = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False  # load_examples reports the problem with its line number
        return any(isinstance(it, dict) and it.get("image") for it in items)
    for line in raw.split(b"\n"):
        if b'"image"' not in line:  # cheap pre-filter: most lines of a text file skip json.loads
            continue
        try:
            item = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(item, dict) and item.get("image"):
            return True
    return False


def split_holdout(examples: Sequence[dict], fraction: float = 0.05, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, val) split; both keep the original order. At least one val example if fraction > 0
    and there are at least two examples."""
    if not 0 <= fraction < 1:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_val = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_val = max(1, min(n_val, n - 1))
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    return (
        [e for i, e in enumerate(examples) if i not in val_idx],
        [e for i, e in enumerate(examples) if i in val_idx],
    )


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens, the token id on response tokens
    truncated: bool = False  # the response was cut at max_len
    dropped: bool = False  # the prompt alone leaves no room for a response token; input_ids/labels are empty
    visual: Any = None  # image features [F] for a multimodal adapter (None: text-only row)
    has_image: bool = False


def _end_ids(tokenizer: Tokenizer, template: str) -> list[int]:
    """Ids closing an assistant turn: `<|im_end|>` for chatml (as text + EOS if it is no single token), else EOS."""
    end = TURN_END[template]
    if end:
        i = tokenizer.token_to_id(end)
        if i is not None:
            return [i]
        return tokenizer.encode(end, eos=True)
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def _segments(example: dict, template: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces whose concatenation is the rendered conversation (turn ends excluded)."""
    if "messages" not in example:
        if template == "alpaca":
            prompt = alpaca_prompt(example["instruction"], example.get("input", ""))
        else:
            user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
            prompt = render_chat([{"role": "user", "content": user}], template, add_generation_prompt=True)
        return [(prompt, False), (example["output"], True)]
    msgs = example["messages"]
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        rendered = render_chat(msgs[:i], template, add_generation_prompt=True)
        assert rendered.startswith(done), "template rendering is not prefix-stable"
        segs.append((rendered[len(done) :], False))
        segs.append((m["content"], True))
        done = rendered + m["content"] + TURN_END[template]
    return segs


def encode_example(example: dict, tokenizer: Tokenizer, template: str, max_len: int) -> Encoded:
    """Token ids and labels for one example (see the module docstring).

    BOS first when `tokenizer.add_bos`; every assistant answer is followed by the turn end (`_end_ids`), which
    carries loss. Longer than `max_len`: the end is cut (`truncated=True`); if no response token would remain,
    the example is `dropped`.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    ids: list[int] = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    end = _end_ids(tokenizer, template)
    for text, is_response in _segments(example, template):
        seg = tokenizer.encode(text)
        if is_response:
            seg = seg + end
            labels += seg
        else:
            labels += [IGNORE_INDEX] * len(seg)
        ids += seg
    if len(ids) <= max_len:
        return Encoded(ids, labels)
    if all(x == IGNORE_INDEX for x in labels[:max_len]):
        return Encoded([], [], truncated=False, dropped=True)
    return Encoded(ids[:max_len], labels[:max_len], truncated=True)


class InstructionDataset(Sequence):
    """Encoded examples (dropped ones removed); `n_truncated` / `n_dropped` count what max_len cost."""

    def __init__(
        self,
        examples: Sequence[dict],
        tokenizer: Tokenizer,
        template: str,
        max_len: int,
        visual: tuple[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor | None] | None = None,
    ):
        """`visual`, aligned with `examples`: (features [N, F], has_image [N]) from
        multimodal.example_features, or a list of per-example features / None (no image) from
        multimodal.example_visuals."""
        self.items: list[Encoded] = []
        self.n_truncated = self.n_dropped = 0
        for i, ex in enumerate(examples):
            enc = encode_example(ex, tokenizer, template, max_len)
            if isinstance(visual, tuple):
                enc.visual, enc.has_image = visual[0][i], bool(visual[1][i])
            elif visual is not None:
                enc.visual, enc.has_image = visual[i], visual[i] is not None
            self.n_dropped += enc.dropped
            self.n_truncated += enc.truncated
            if not enc.dropped:
                self.items.append(enc)
        self.n_examples = len(examples)
        if self.n_truncated or self.n_dropped:
            log.warning(
                "%d of %d examples truncated, %d dropped because the prompt alone exceeds max_len=%d; raise --max-len",
                self.n_truncated,
                self.n_examples,
                self.n_dropped,
                max_len,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[i]

    @property
    def lengths(self) -> list[int]:
        return [len(it.input_ids) for it in self.items]


# ------------------------------------------------------------------------------------------------ batching
def _get(item: Any, key: str) -> list[int]:
    return item[key] if isinstance(item, dict) else getattr(item, key)


def target_count(item: Any) -> int:
    """Tokens that carry loss in one encoded item (the loss at position t predicts labels[t + 1])."""
    return sum(1 for t in _get(item, "labels")[1:] if t != IGNORE_INDEX)


def _visual_fields(items: Sequence[Any]) -> dict[str, torch.Tensor]:
    """`visual` [n, F] and `has_image` [n] of `items` in order, or nothing when no item has an image.
    Joint image + text batches: text items get zero features and has_image False."""
    vis = [getattr(it, "visual", None) if not isinstance(it, dict) else it.get("visual") for it in items]
    first = next((v for v in vis if v is not None), None)
    if first is None:
        return {}
    zero = torch.zeros(torch.as_tensor(first).shape)
    has = [v is not None and bool(it.get("has_image", True) if isinstance(it, dict) else it.has_image)
           for v, it in zip(vis, items)]  # fmt: skip
    return {
        "visual": torch.stack([zero if v is None else torch.as_tensor(v, dtype=torch.float32) for v in vis]),
        "has_image": torch.tensor(has),
    }


def collate(items: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids [B, T] (pad_id), labels [B, T] (-100 on padding), lengths [B]."""
    lengths = [len(_get(it, "input_ids")) for it in items]
    t = max(lengths, default=0)
    input_ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    labels = torch.full((len(items), t), IGNORE_INDEX, dtype=torch.long)
    for b, it in enumerate(items):
        n = lengths[b]
        input_ids[b, :n] = torch.tensor(_get(it, "input_ids"), dtype=torch.long)
        labels[b, :n] = torch.tensor(_get(it, "labels"), dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels, "lengths": torch.tensor(lengths, dtype=torch.long)}
    return {**out, **_visual_fields(items)}


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    sort_by_length: bool = True,
    drop_last: bool = False,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """Index batches, deterministic given (seed, epoch).

    shuffle: seeded permutation, then (sort_by_length) sort by length inside chunks of `chunk_batches *
    batch_size` so each batch holds similar lengths, then shuffle the batch order. Without shuffle: the original
    order, or longest first when sort_by_length (for evaluation). drop_last drops the one incomplete batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    if shuffle:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(n))
        rng.shuffle(order)
        if sort_by_length:
            chunk = chunk_batches * batch_size
            order = [i for s in range(0, n, chunk) for i in sorted(order[s : s + chunk], key=lambda j: -lengths[j])]
    else:
        order = sorted(range(n), key=lambda j: -lengths[j]) if sort_by_length else list(range(n))
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches


def iterate_batches(items: Sequence[Any], batch_size: int, pad_id: int, **order: Any) -> Iterator[dict]:
    """DataLoader-free iterator of collated batches over encoded items; `order` are the keyword
    arguments of `batch_indices` (shuffle, seed, epoch, sort_by_length, drop_last)."""
    lengths = [len(_get(it, "input_ids")) for it in items]
    for b in batch_indices(lengths, batch_size, **order):
        yield collate([items[i] for i in b], pad_id)


# ------------------------------------------------------------------------------------------------- packing
def pack_bins(
    lengths: Sequence[int], n_bins: int, *, seed: int = 0, epoch: int = 0, jitter: float = 0.25
) -> list[list[int]]:
    """Item indices into exactly `n_bins` bins holding about equal numbers of tokens.

    Longest first, each item goes to the bin with the fewest tokens so far (LPT scheduling: every bin
    ends within about one short item of the mean). `jitter` scales each length by a seeded factor in
    [1 - jitter, 1 + jitter] for the order alone, so which examples share a bin changes every epoch:
    with 0.25 on the Alpaca demo, two examples that share a bin in one epoch share one in the next
    about as rarely as at random (1%, against 9% without jitter), and every bin stays within 3% of
    the mean. Deterministic given (seed, epoch); each bin lists its indices in ascending order; bins
    stay empty only when there are more bins than items."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    rng = random.Random(seed * 1_000_003 + epoch)
    keys = [-n * (1 + jitter * rng.uniform(-1, 1)) for n in lengths]
    heap = [(0, rng.random(), b) for b in range(n_bins)]  # (tokens, random tie-break, bin)
    heapq.heapify(heap)
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in sorted(range(len(lengths)), key=keys.__getitem__):
        load, _, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], rng.random(), b))
    return [sorted(b) for b in bins]


def packed_steps(
    lengths: Sequence[int], n_steps: int, micro: int, *, seed: int = 0, epoch: int = 0
) -> list[list[list[int]]]:
    """One epoch as `n_steps` optimizer steps of about equal token counts (`pack_bins`), each split into
    `micro` micro-batches (processes x accumulation) of about equal token counts, one packed row each.
    The steps do not depend on `micro`: 1 process x 4 micro-batches and 4 processes x 1 train on the
    same examples at every step. A step with fewer examples than `micro` leaves some micro-batches
    empty (`collate_packed` turns one into a batch without a target)."""
    out = []
    for step in pack_bins(lengths, n_steps, seed=seed, epoch=epoch):
        parts = pack_bins([lengths[i] for i in step], micro, jitter=0.0)
        out.append([[step[j] for j in part] for part in parts])
    return out


def collate_packed(rows: Sequence[Sequence[Any]], pad_id: int) -> dict[str, Any]:
    """Examples side by side: row b holds the items of `rows[b]` one after another, rows right-padded
    to the longest (one row: no padding at all). input_ids / labels [B, T], lengths [n] per example,
    `packing` (the spans, examples numbered row by row) and, with images, visual [n, F] / has_image
    [n] in that order. Each example's first label is -100: the token before it belongs to the
    previous example, which must not learn to predict it. A batch without any item (a micro-batch
    a short step left empty) is one pad token with no target, so every process still runs a step."""
    empty = not any(len(r) for r in rows)
    rows = [list(r) for r in rows if len(r)] or [[{"input_ids": [pad_id], "labels": [IGNORE_INDEX]}]]
    lengths = [[len(_get(it, "input_ids")) for it in r] for r in rows]
    t = max(sum(r) for r in lengths)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    spans: list[list[tuple[int, int]]] = []
    for b, (row, lens) in enumerate(zip(rows, lengths)):
        spans.append([])
        s = 0
        for it, n in zip(row, lens):
            input_ids[b, s : s + n] = torch.tensor(_get(it, "input_ids"), dtype=torch.long)
            labels[b, s + 1 : s + n] = torch.tensor(_get(it, "labels")[1:], dtype=torch.long)
            spans[-1].append((s, s + n))
            s += n
    items = [it for r in rows for it in r]
    real = [0] if empty else [n for r in lengths for n in r]
    out = {"input_ids": input_ids, "labels": labels, "lengths": torch.tensor(real, dtype=torch.long)}
    return {**out, "packing": Packing(spans), **_visual_fields(items)}


def pad_fraction(batch: dict[str, Any]) -> float:
    """Share of the batch's token slots that hold no example (padding)."""
    return 1.0 - float(batch["lengths"].sum()) / max(batch["input_ids"].numel(), 1)
