"""Shared pieces of the reproduction scripts (see experiments/README.md).

Every script trains on ALL of `../shared/data/alpaca/alpaca_en_demo.json` (999 examples) minus a fixed
held-out 10% (seed 0, the same for every run and seed): 899 training examples, 100 held out for the loss
and for the Alpaca-MC questions. Nothing is cut: examples keep their full length (up to 742 tokens).
Training goes through the packed trainer (`llama_adapter.train.fit`, ~2,048 tokens per step), at least
2 epochs, 3 seeds (the seed draws the adapter init and the data order; the split stays fixed).

Each training run is one `Run` (method, layers, K, gate init, seed, ...) executed in a fresh process
(`python experiments/common.py --run JSON`), so its peak RSS is its own, and cached as
`OUT/runs/<key>.json`: scripts that need the same run (the L=30, K=10 adapter of zero_init.py,
layers_and_length.py and adapter_vs_lora.py) train it once, and an interrupted sweep resumes where it
stopped. `--quick` trains 24 examples for 1 epoch with 2 seeds (a smoke test, written elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODEL_NAME = "smollm2-135m-instruct"
ALPACA = ROOT.parents[1] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
VAL_FRACTION = 0.10
LRS = {"adapter": 1e-2, "lora": 1e-3, "full": 5e-5}  # one common value per method, not tuned
SEEDS = (0, 1, 2)


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL_NAME, help="checkpoint.load_model spec")
    p.add_argument("--quick", action="store_true", help="24 examples, 1 epoch, 2 seeds: a smoke test")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per configuration (default 3)")
    p.add_argument("--epochs", type=float, default=2.0, help="epochs per run (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="results folder (default results/, or results/quick with --quick)")
    return p


@dataclass
class Setup:
    """What every run of a script shares; `for_args` applies --quick and the flags."""

    out: Path
    model: str = MODEL_NAME
    epochs: float = 2.0
    seeds: tuple[int, ...] = SEEDS
    n_train: int | None = None  # None: every training example
    n_val: int | None = None  # None: every held-out example
    batch_tokens: int = 2048
    threads: int = 2
    quick: bool = False

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Setup:
        out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "")
        s = cls(out, args.model, args.epochs, SEEDS[: args.seeds], threads=args.threads, quick=args.quick)
        if args.quick:
            s.epochs, s.seeds, s.n_train, s.n_val, s.batch_tokens = 1.0, (0, 1), 24, 12, 1024
        return s

    def run(self, **kw: Any) -> Run:
        base = {"model": self.model, "epochs": self.epochs, "n_train": self.n_train, "n_val": self.n_val,
                "batch_tokens": self.batch_tokens, "threads": self.threads}  # fmt: skip
        return Run(**{**base, **kw})


@dataclass(frozen=True)
class Run:
    """One training run. Everything that changes its numbers is a field (and part of the cache key)."""

    method: str = "adapter"  # adapter | lora | full
    layers: int = 30  # adapter: top L layers
    adapter_len: int = 10  # adapter: K
    gate: str = "zero"  # adapter: zero | random (tanh(N(0, 1)) per head, drawn with seed 1000 + seed)
    seed: int = 0
    epochs: float = 2.0
    lr: float | None = None  # None: LRS[method]
    constant_lr: bool = False  # no warm-up or decay (the over-fitting study)
    n_train: int | None = None
    n_val: int | None = None
    batch_tokens: int = 2048
    evals_per_epoch: int = 2  # held-out loss curve points
    lora_rank: int = 8
    model: str = MODEL_NAME
    threads: int = field(default=2, compare=False)

    @property
    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "threads"}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        if self.method != "adapter":
            return self.method
        return f"L={self.layers} K={self.adapter_len}" + (" random gates" if self.gate == "random" else "")


# ------------------------------------------------------------------------------------------ data
def load_base(spec: str) -> tuple[nn.Module, Any, str]:
    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    model = load_model(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(model.config.extra["tokenizer"])
    template = "chatml" if getattr(tok, "chat_template", "") == "chatml" else "alpaca"
    return model.eval(), tok, template


def split(n_train: int | None = None, n_val: int | None = None) -> tuple[list[dict], list[dict]]:
    """The fixed (train, held-out) examples: 10% held out with seed 0, whatever the run's seed."""
    from llama_adapter.data import load_examples, split_holdout

    train, val = split_holdout(load_examples(ALPACA), VAL_FRACTION, seed=0)
    return train[:n_train], val[:n_val]


def _clip(text: str, words: int = 12) -> str:
    w = " ".join(text.split()).split(" ")
    return " ".join(w[:words]) + (" ..." if len(w) > words else "")


def make_mc(pool: list[dict], seed: int = 0, k: int = 4) -> list[Any]:
    """'Alpaca-MC': each held-out instruction as the question, its own (clipped) output and k-1 outputs
    of other held-out instructions as options. Measures whether the model can tell the right response
    from unrelated ones listed as lettered options (answer = letter log-likelihood): a format/matching
    skill, not knowledge or reasoning like ScienceQA. Chance = 1/k."""
    from llama_adapter.evaluate import MCItem

    rng = random.Random(seed + 1)
    items = []
    for i, ex in enumerate(pool):
        others = rng.sample([j for j in range(len(pool)) if j != i], k - 1)
        choices = [_clip(pool[j]["output"]) for j in others]
        ans = rng.randrange(k)
        choices.insert(ans, _clip(ex["output"]))
        q = ex["instruction"] + (f" {ex['input']}" if ex.get("input") else "")
        items.append(MCItem(f"alpaca-{i}", _clip(q, 40), choices, ans))
    return items


# ----------------------------------------------------------------------------------------- models
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen, A ~ kaiming-uniform, B = 0 (as peft's LoRA)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def build(run: Run, base: nn.Module) -> nn.Module:
    """The model `fit` trains: every parameter that requires grad is trained."""
    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig

    torch.manual_seed(run.seed)
    if run.method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    if run.method == "lora":  # the LoRA paper's setting: r=8, alpha=16 on the query and value projections
        for layer in base.layers:
            layer.attention.wq = LoRALinear(layer.attention.wq, run.lora_rank, 2 * run.lora_rank)
            layer.attention.wv = LoRALinear(layer.attention.wv, run.lora_rank, 2 * run.lora_rank)
        return base
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=run.adapter_len, adapter_layers=run.layers))
    if run.gate == "random":
        with torch.no_grad():
            g = torch.Generator().manual_seed(1000 + run.seed)
            m.adapter.gates.copy_(torch.randn(m.adapter.gates.shape, generator=g))
    return m


# ------------------------------------------------------------------------------------------- runs
def execute(run: Run) -> dict[str, Any]:
    """Train and evaluate `run` in this process: the held-out loss curve, the final held-out loss and
    Alpaca-MC accuracy, training seconds (evaluation excluded), tokens/s and the training's peak RSS."""
    from llama_adapter.data import InstructionDataset
    from llama_adapter.evaluate import eval_mc
    from llama_adapter.train import Recipe, Schedule, TrainArgs

    torch.set_num_threads(run.threads)
    base, tok, template = load_base(run.model)
    train_ex, val_ex = split(run.n_train, run.n_val)
    train, val = (InstructionDataset(ex, tok, template, base.config.max_seq_len) for ex in (train_ex, val_ex))
    total = sum(p.numel() for p in base.parameters())
    model = build(run, base)
    lr = run.lr or LRS[run.method]
    args = TrainArgs(
        batch_tokens=run.batch_tokens, epochs=run.epochs, lr=lr, min_lr=lr if run.constant_lr else 0.0,
        warmup_steps=0 if run.constant_lr else None, warmup_epochs=0.1, save_every=10**9, seed=run.seed,
    )  # fmt: skip
    per_epoch = Schedule.plan(args, train.lengths, 1).steps_per_epoch
    args.eval_every = max(1, per_epoch // run.evals_per_epoch)
    recipe = Recipe(args, progress=True)
    recipe.use(model, train.items, val.items, pad_id=tok.pad_id)
    recipe.setup_optimizer()
    evaluate, eval_s = recipe.evaluate, [0.0]

    def timed() -> float:
        t = time.perf_counter()
        value = evaluate()
        eval_s[0] += time.perf_counter() - t
        return value

    recipe.evaluate = timed  # type: ignore[method-assign]
    reset_peak_rss()
    t0 = time.perf_counter()
    res = recipe.train()
    train_s = time.perf_counter() - t0 - eval_s[0]
    peak = train_peak_rss_mb()
    model.eval()
    acc = eval_mc(model, tok, make_mc(val_ex), template=template, target="letter", batch_size=8)["accuracy"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {}
    if run.n_train is not None:  # a smoke run: what an epoch of the full set holds, for `estimate`
        extra["full_epoch_tokens"] = sum(InstructionDataset(split()[0], tok, template, base.config.max_seq_len).lengths)
    return {**extra,
        "run": asdict(run), "steps": res.steps, "steps_per_epoch": per_epoch, "lr": lr, "val0": res.val_losses[0][1],
        "val": res.val_losses[-1][1], "val_curve": res.val_losses, "train_curve": res.train_losses, "mc_acc": acc,
        "train_s": train_s, "tokens": sum(train.lengths) * res.steps / per_epoch, "trainable": trainable,
        "total_params": total, "train_peak_rss_mb": peak, "n_train": len(train), "n_val": len(val),
        "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip


def run_all(runs: list[Run], out: Path) -> list[dict[str, Any]]:
    """Each run's result, from out/runs/<key>.json or else trained in a fresh process and saved there."""
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs):
        path = folder / f"{run.key}.json"
        if path.is_file():
            log(f"[{i + 1}/{len(runs)}] {run.label} seed {run.seed}: cached in {path}")
        else:
            log(f"[{i + 1}/{len(runs)}] {run.label} seed {run.seed} ({run.method}, {run.epochs:g} epochs)")
            cmd = [sys.executable, __file__, "--run", json.dumps(asdict(run))]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            path.write_text(line[len("RESULT ") :])
        results.append(json.loads(path.read_text()))
        r = results[-1]
        log(f"    held-out {r['val0']:.4f} -> {r['val']:.4f}, MC {r['mc_acc']:.3f}, {r['train_s']:.0f}s training")
    return results


def base_scores(s: Setup) -> dict[str, float]:
    """The frozen base's held-out loss and Alpaca-MC accuracy (cached like a run)."""
    from llama_adapter.data import InstructionDataset, batch_indices, collate
    from llama_adapter.evaluate import eval_mc
    from llama_adapter.train import evaluate_loss

    path = s.out / "runs" / f"base-{Run(model=s.model, n_val=s.n_val).key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(s.threads)
    base, tok, template = load_base(s.model)
    _, val_ex = split(None, s.n_val)
    val = InstructionDataset(val_ex, tok, template, base.config.max_seq_len)
    batches = [collate([val[i] for i in b], tok.pad_id) for b in batch_indices(val.lengths, 8, shuffle=False)]
    out = {
        "val": evaluate_loss(base, batches),
        "mc_acc": eval_mc(base, tok, make_mc(val_ex), template=template, target="letter", batch_size=8)["accuracy"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------------ aggregation
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], digits: int = 4, scale: float = 1.0) -> str:
    """'mean ± std' over seeds."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def per_seed(values: list[float], digits: int = 4, scale: float = 1.0) -> str:
    return " / ".join(f"{scale * v:.{digits}f}" for v in values)


def grouped(results: list[dict[str, Any]], by: str = "label") -> dict[str, list[dict[str, Any]]]:
    """Results grouped per configuration (every field of the run but the seed), in order of appearance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        run = Run(**r["run"])
        out.setdefault(run.label if by == "label" else by, []).append(r)
    return out


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


def full_setup(s: Setup) -> Setup:
    """The setup a run without --quick would use (for `estimate`)."""
    return Setup(RESULTS, s.model, threads=s.threads)


def estimate(results: list[dict[str, Any]], full_runs: list[Run]) -> str:
    """The wall time the full runs would take, from the training rate (tokens/s) each quick run
    measured: per full run, its epochs x the full training set's tokens / the rate of a quick run of
    the same method and depth (else the same method, else any), plus ~10% for evaluation."""
    if not results or not all("full_epoch_tokens" in r for r in results):
        return ""
    rates: dict[Any, list[float]] = {}
    for r in results:
        rate = r["tokens"] / max(r["train_s"], 1e-9)
        for key in ((r["run"]["method"], r["run"]["layers"]), r["run"]["method"], None):
            rates.setdefault(key, []).append(rate)
    tokens = results[0]["full_epoch_tokens"]
    secs = 0.0
    for run in full_runs:
        key = next(k for k in ((run.method, run.layers), run.method, None) if k in rates)
        secs += run.epochs * tokens / statistics.fmean(rates[key])
    load = statistics.fmean(r["load"] for r in results)
    return (
        f"\nEstimated wall time of the full runs ({len(full_runs)} runs, {tokens:,} training tokens an epoch), "
        f"from these quick runs' training rates at a 1-minute load average of {load:.1f}: {1.1 * secs / 3600:.1f} h "
        "(training + ~10% evaluation; runs cached by another script are not trained again).\n"
    )


def write_result(s: Setup, name: str, title: str, body: str, raw: dict[str, Any]) -> Path:
    s.out.mkdir(parents=True, exist_ok=True)
    results = raw.get("results", [])
    first = results[0] if results else {}
    head = (
        f"# {title}\n\nModel `{s.model}`; Alpaca demo: {first.get('n_train', '?')} training / "
        f"{first.get('n_val', '?')} held-out examples (fixed 10% split, seed 0; held-out loss and as many "
        f"Alpaca-MC questions, 4 options, chance 25%), nothing truncated; packed steps of ~{s.batch_tokens} "
        f"tokens, {s.epochs:g} epochs, seeds {', '.join(map(str, s.seeds))} (mean ± std over seeds; per-seed "
        f"values in seed order). Generated by `experiments/{name}.py{' --quick' if s.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}, {s.threads} CPU threads.\n\n"
    )
    p = s.out / f"{name}.md"
    p.write_text(head + body)
    (s.out / f"{name}.json").write_text(json.dumps(raw, indent=2, default=str))
    print(head + body)
    return p


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


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--run":
    print("RESULT " + json.dumps(execute(Run(**json.loads(sys.argv[2])))))
