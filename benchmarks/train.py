"""Training speed and memory: our adapter vs PEFT `AdaptionPrompt` on the same weights and batches.

Each configuration runs in a fresh subprocess, so its peak RSS (`resource.getrusage` ru_maxrss) is
its own. The transformers `LlamaForCausalLM` is built in memory from our loaded weights (see
benchmarks/generate.py), then our copy is freed before PEFT trains. Batches are Alpaca examples
(chatml template) padded / truncated to exactly T tokens; tokens/s counts B*T per step.

    python benchmarks/train.py                 # full run, writes benchmarks/results.md
    python benchmarks/train.py --quick         # fewer steps, small scaling grid
    python benchmarks/train.py --steps 5 --threads 2
    python benchmarks/train.py --only-scaling  # the scaling grid (seq 128..2048, batch 1..8) and its plot

"peak RSS" is the whole process; "train peak" is the peak during the timed steps alone (the kernel's
high-water mark is reset after setup through /proc/self/clear_refs), which excludes loading.
Prints markdown on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The shared data folder sits beside the repository (as in CI); ALPACA_DATA overrides it.
DATA = os.environ.get("ALPACA_DATA", str(HERE.parent.parent / "shared/data/alpaca/alpaca_en_demo.json"))
MODEL = "smollm2-135m-instruct"
RESULTS = HERE / "results.md"
SECTION = "## Training speed"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_batches(tok, n: int, batch: int, seq: int):
    import torch

    from llama_adapter.data import InstructionDataset, load_examples

    items = InstructionDataset(load_examples(DATA)[: n * batch * 2], tok, "chatml", seq).items
    out = []
    for s in range(n):
        rows = [items[(s * batch + b) % len(items)] for b in range(batch)]
        ids = torch.full((batch, seq), tok.pad_id, dtype=torch.long)
        labels = torch.full((batch, seq), -100, dtype=torch.long)
        for b, it in enumerate(rows):
            ids[b, : len(it.input_ids)] = torch.tensor(it.input_ids)
            labels[b, : len(it.labels)] = torch.tensor(it.labels)
        out.append({"input_ids": ids, "labels": labels})
    return out


def worker(cfg: dict) -> dict:
    """One configuration: load, build, one warm-up step, `steps` timed steps."""
    import torch
    import torch.nn.functional as F

    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = load_model(MODEL, dtype=torch.float32, progress=False)
    tok = load_tokenizer(model.config.extra["tokenizer"])
    batches = make_batches(tok, cfg["steps"] + 1, cfg["batch"], cfg["seq"])
    K, L = 10, cfg["layers"]

    if cfg["impl"] == "ours":
        from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig

        net = AdaptedLLaMA(model, AdapterConfig(adapter_len=K, adapter_layers=L)).train()
        ckpt = cfg.get("ckpt", False)

        def loss_fn(b):
            # As train.token_loss_sum: project only the positions that carry a loss.
            h = net(b["input_ids"], hidden_only=True, checkpoint_activations=ckpt)
            t = b["labels"][:, 1:]
            keep = t != -100
            return F.cross_entropy(net.model.output(h[:, :-1][keep]), t[keep])
    else:
        import warnings

        from peft import AdaptionPromptConfig, get_peft_model

        sys.path.insert(0, str(HERE))
        from generate import hf_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = hf_model(model)
        del model
        gc.collect()
        net = get_peft_model(hf, AdaptionPromptConfig(adapter_len=K, adapter_layers=L, task_type="CAUSAL_LM"))
        net.train()

        def loss_fn(b):
            return net(input_ids=b["input_ids"], labels=b["labels"]).loss

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step(b):
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(batches[0])  # warm-up (allocator, optimizer state)
    gc.collect()
    setup_mb = rss_mb()
    reset = reset_peak()
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    train_peak = rss_mb()
    times.sort()
    med = times[len(times) // 2]
    return {
        **cfg,
        "s_step": med,
        "min_s_step": times[0],
        "tok_s": cfg["batch"] * cfg["seq"] / med,
        "peak_mb": max(setup_mb, train_peak),
        "train_peak_mb": train_peak if reset else None,
        "trainable": sum(p.numel() for p in params),
    }


def run(cfg: dict) -> dict:
    log(f"  {cfg}")
    p = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise RuntimeError(f"{cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="2 timed steps, small scaling grid")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    ap.add_argument("--only-scaling", action="store_true", help="only the scaling table (and plot)")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    steps = 2 if args.quick else args.steps
    base = {"threads": args.threads, "steps": steps, "batch": 4, "seq": 256}

    out: list[str] = []
    if not args.only_scaling:
        out += versus_peft(base, steps, args.threads)
    if not args.no_scaling:
        out += scaling(base, args.quick)
    return write(out, args.no_write, args.only_scaling)


def versus_peft(base: dict, steps: int, threads: int) -> list[str]:
    log("training: ours vs PEFT AdaptionPrompt, K=10")
    peft30 = run({**base, "impl": "peft", "layers": 30})
    ours30 = run({**base, "impl": "ours", "layers": 30})
    ours10 = run({**base, "impl": "ours", "layers": 10})
    peft10 = run({**base, "impl": "peft", "layers": 10})

    out = [
        f"{SECTION}: {MODEL}, fp32, {threads} threads, batches of 4x256 Alpaca tokens, K=10\n",
        f"Median of {steps} steps (AdamW, forward+backward+update) after one warm-up step; each row a fresh process. "
        "PEFT runs on a transformers LlamaForCausalLM holding the same weights.\n",
        "| adapter | layers | s/step | tokens/s | peak RSS MB | train peak MB | s/step ours/PEFT | peak ours/PEFT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o, p in ((ours30, peft30), (ours10, peft10)):
        for r, name in ((o, "ours"), (p, "PEFT AdaptionPrompt")):
            ratio = f"{o['s_step'] / p['s_step']:.2f}" if r is o else ""
            mem = f"{o['peak_mb'] / p['peak_mb']:.2f}" if r is o else ""
            out.append(
                f"| {name} | top {r['layers']} | {r['s_step']:.3f} | {r['tok_s']:.0f} | {fmt_mb(r['peak_mb'])} | "
                f"{fmt_mb(r['train_peak_mb'])} | {ratio} | {mem} |"
            )
    out.append(
        f"\nThroughput ours/PEFT at L=30: {peft30['s_step'] / ours30['s_step']:.2f}x (target >= 2x); "
        f"ours top-10 vs top-30: {ours30['s_step'] / ours10['s_step']:.2f}x faster "
        f"(frozen bottom under no_grad).\n"
    )
    return out


def scaling(base: dict, quick: bool) -> list[str]:
    """Step time and train-peak memory of ours (K=10, L=30) over sequence length and batch size, with
    and without activation checkpointing; one timed step per cell (they are long), plotted to scaling.png."""
    log("scaling: ours, L=30, with and without activation checkpointing")
    seqs = (128, 512, 2048) if quick else (128, 256, 512, 1024, 2048)
    grid = [(1, s) for s in seqs] + [(b, 256) for b in ((4,) if quick else (2, 4, 8))]
    cells = []
    for b, s in sorted(set(grid)):
        cfg = {**base, "steps": 1, "impl": "ours", "layers": 30, "batch": b, "seq": s}
        cells.append((b, s, run(cfg), run({**cfg, "ckpt": True})))
    out = [
        f"### Scaling: ours, K=10, L=30, {base['threads']} threads (one timed step per cell)\n",
        "| batch | seq | s/step | tokens/s | train peak MB | ckpt s/step | ckpt train peak MB | ckpt memory saved |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, s, plain, ck in cells:
        saved = "-"
        if plain["train_peak_mb"] and ck["train_peak_mb"]:
            saved = f"{100 * (1 - ck['train_peak_mb'] / plain['train_peak_mb']):.0f}%"
        out.append(
            f"| {b} | {s} | {plain['s_step']:.2f} | {plain['tok_s']:.0f} | {fmt_mb(plain['train_peak_mb'])} | "
            f"{ck['s_step']:.2f} | {fmt_mb(ck['train_peak_mb'])} | {saved} |"
        )
    png = plot_scaling(cells)
    if png:
        out.append(f"\n![scaling]({png.name})\n")
    return out


def plot_scaling(cells: list) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return None
    # One x axis for both series: tokens per step (batch x seq), so batch and length growth compare directly.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, unit in (("s_step", axes[0], "s/step"), ("train_peak_mb", axes[1], "train peak MB")):
        for series, label in (("seq", "batch 1, seq 128..2048"), ("batch", "seq 256, batch 1..8")):
            pts = sorted((b * s, p, c) for b, s, p, c in cells if (b == 1 if series == "seq" else s == 256))
            if len(pts) < 2:
                continue
            xs = [x for x, _, _ in pts]
            ax.plot(xs, [p[key] or 0 for _, p, _ in pts], "o-", label=label)
            ax.plot(xs, [c[key] or 0 for _, _, c in pts], "x--", label=f"{label}, checkpointed")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step (batch x seq)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"{MODEL}: adapter training (K=10, L=30), fp32 CPU")
    fig.tight_layout()
    path = HERE / "scaling.png"
    fig.savefig(path, dpi=100)
    log(f"wrote {path}")
    return path


def write(out: list[str], no_write: bool, only_scaling: bool) -> int:
    text = "\n".join(out)
    print(text)
    if no_write:
        return 0
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    heading = "### Scaling" if only_scaling else SECTION
    head, sep, rest = old.partition(heading)
    tail = rest[rest.find("\n## ") + 1 :] if sep and "\n## " in rest else ""
    if only_scaling and not sep:
        # Insert after the training table's section so the two stay together.
        head, sep, rest = old.partition(SECTION)
        nxt = rest.find("\n## ")
        head = head + sep + (rest[:nxt] if nxt >= 0 else rest)
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
    RESULTS.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""))
    log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
