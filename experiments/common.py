"""Shared pieces of the small-scale reproduction scripts (see experiments/README.md).

Every script trains on the SAME fixed subset of Alpaca (`../shared/data/alpaca/alpaca_en_demo.json`):
examples whose whole chat-formatted encoding fits in `max_len` tokens, shuffled with a fixed seed,
then cut into disjoint train / held-out-loss / held-out-MC pools. Training goes through
`llama_adapter.train.fit` and evaluation through `llama_adapter.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_adapter.data import InstructionDataset, batch_indices, collate, load_examples
from llama_adapter.evaluate import MCItem, eval_mc
from llama_adapter.train import TrainArgs, evaluate_loss, fit

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODEL_NAME = "smollm2-135m-instruct"
ALPACA = ROOT.parents[1] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint.load_model spec")
    p.add_argument("--quick", action="store_true", help="a tinier run (smoke test; results not committed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--max-len", type=int, help="token cap per example (default 64; 48 with --quick)")
    return p


@dataclass
class Setup:
    max_len: int = 64
    n_train: int = 16
    n_val: int = 8
    n_mc: int = 16
    batch_size: int = 4
    epochs: float = 2.0

    @classmethod
    def for_args(cls, args: argparse.Namespace, **kw: Any) -> Setup:
        s = cls(**kw)
        if args.quick:
            s.n_train, s.n_val, s.n_mc, s.epochs, s.max_len = 8, 4, 4, 1.0, 48
        if args.max_len:
            s.max_len = args.max_len
        return s


def load_base(spec: str):
    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    global MODEL_NAME
    MODEL_NAME = spec
    model = load_model(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(model.config.extra["tokenizer"])
    template = "chatml" if getattr(tok, "chat_template", "") == "chatml" else "alpaca"
    return model.eval(), tok, template


@dataclass
class Data:
    train: InstructionDataset
    val: InstructionDataset
    mc: list[MCItem]
    n_pool: int


def make_data(tok, template: str, s: Setup, seed: int = 0) -> Data:
    """Fixed, disjoint train / held-out / MC subsets of the short Alpaca examples."""
    examples = load_examples(ALPACA)
    short = [ex for ex in examples if len(InstructionDataset([ex], tok, template, 10**6)[0].input_ids) <= s.max_len]
    random.Random(seed).shuffle(short)
    train = short[: s.n_train]
    val = short[s.n_train : s.n_train + s.n_val]
    mc_pool = short[s.n_train + s.n_val :]
    return Data(
        InstructionDataset(train, tok, template, s.max_len),
        InstructionDataset(val, tok, template, s.max_len),
        make_mc(mc_pool, s.n_mc, seed),
        len(short),
    )


def _clip(text: str, words: int = 12) -> str:
    w = " ".join(text.split()).split(" ")
    return " ".join(w[:words]) + (" ..." if len(w) > words else "")


def make_mc(pool: list[dict], n: int, seed: int = 0, k: int = 4) -> list[MCItem]:
    """'Alpaca-MC': the instruction as the question, its own (clipped) output and k-1 outputs of other
    held-out instructions as options. Measures whether the model can tell the right response from
    unrelated ones when they are listed as lettered options (answer = letter log-likelihood): a
    format/matching skill, not knowledge or reasoning like ScienceQA. Chance = 1/k."""
    rng = random.Random(seed + 1)
    items = []
    for i in range(min(n, len(pool) - k)):
        ex = pool[i]
        others = rng.sample([j for j in range(len(pool)) if j != i], k - 1)
        choices = [_clip(pool[j]["output"]) for j in others]
        ans = rng.randrange(k)
        choices.insert(ans, _clip(ex["output"]))
        q = ex["instruction"] + (f" {ex['input']}" if ex.get("input") else "")
        items.append(MCItem(f"alpaca-{i}", _clip(q, 40), choices, ans))
    return items


def held_out_loss(model: nn.Module, ds, pad_id: int, batch_size: int = 8) -> float:
    batches = [
        collate([ds[i] for i in b], pad_id)
        for b in batch_indices([len(it.input_ids) for it in ds], batch_size, shuffle=False)
    ]
    return evaluate_loss(model, batches)


def mc_accuracy(model: nn.Module, tok, items: list[MCItem], template: str) -> float:
    return eval_mc(model, tok, items, template=template, target="letter", batch_size=8)["accuracy"]


def train(
    model: nn.Module,
    data: Data,
    s: Setup,
    pad_id: int,
    *,
    lr: float,
    epochs: float | None = None,
    eval_every: int = 10**9,
    with_val: bool = True,
    seed: int = 0,
):
    """`fit` with a short warm-up and cosine decay; returns (FitResult, seconds)."""
    args = TrainArgs(
        lr=lr,
        epochs=epochs or s.epochs,
        batch_size=s.batch_size,
        warmup_steps=2,
        eval_every=eval_every,
        save_every=10**9,
        weight_decay=0.02,
        clip_grad=1.0,
        seed=seed,
        max_len=s.max_len,
    )
    t0 = time.perf_counter()
    res = fit(model, data.train, data.val if with_val else [], args, pad_id=pad_id, progress=True)
    return res, time.perf_counter() - t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) so a phase can be measured on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def train_peak_rss_mb() -> float:
    """VmHWM: peak RSS since the last `reset_peak_rss` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_result(out: Path, name: str, title: str, setup: Setup, data: Data, body: str, raw: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    head = (
        f"# {title}\n\nModel `{MODEL_NAME}`; Alpaca demo subset: {len(data.train)} train / {len(data.val)} "
        f"held-out (loss) / {len(data.mc)} held-out Alpaca-MC questions (4 options, chance 25%), "
        f"{setup.max_len}-token cap, batch {setup.batch_size}; fixed seed 0. Generated by "
        f"`experiments/{name}.py` on {time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU threads.\n\n"
    )
    p = out / f"{name}.md"
    p.write_text(head + body)
    (out / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
    print(head + body)
    return p


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
