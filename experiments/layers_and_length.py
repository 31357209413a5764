"""Adapted layers L and prompt length K (paper, ScienceQA val: L = 10/20/30 -> 55.95/73.36/83.85).

Sweep 1: top L of the 30 layers adapted, K = 10. Sweep 2: K in {1, 5, 10, 20} with L = 10 (the
cheapest L: only the top 10 layers need a backward pass, which keeps this sweep within a few
CPU-minutes). Same seed, data and schedule for every run.

    .venv/bin/python experiments/layers_and_length.py [--quick]
"""

from __future__ import annotations

import json
from pathlib import Path

import common as C
import torch

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, count_trainable

LR = 1e-2


def run(base, tok, template, data, s, L: int, K: int) -> dict:
    torch.manual_seed(0)
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=K, adapter_layers=L))
    res, secs = C.train(m, data, s, tok.pad_id, lr=LR)
    acc = C.mc_accuracy(m, tok, data.mc, template)
    out = {
        "L": L,
        "K": K,
        "trainable": count_trainable(m),
        "val0": res.val_losses[0][1],
        "val": res.val_losses[-1][1],
        "mc_acc": acc,
        "seconds": secs,
        "train": res.train_losses,
    }
    m.detach_base()
    C.log(f"L={L} K={K}: held-out {out['val0']:.4f} -> {out['val']:.4f}, MC {acc:.3f}, {secs:.0f}s")
    return out


def reuse_zero_init(out: Path, n: int) -> dict | None:
    """The L=30, K=10 run is exactly zero_init.py's zero-init run (same seed, data, lr, schedule;
    evaluations do not touch the training state): reuse it rather than spend the CPU again."""
    p = out / "zero_init.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())["runs"]["zero-init gate"]
    C.log(f"L={n} K=10: reused from {p}")
    return {
        "L": n,
        "K": 10,
        "trainable": r["trainable"],
        "val0": r["val"][0][1],
        "val": r["val"][-1][1],
        "mc_acc": r["mc_acc"],
        "seconds": r["seconds"],
        "train": r["train"],
        "reused": str(p.name),
    }


def main() -> None:
    p = C.parser(__doc__)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s = C.Setup.for_args(args)
    base, tok, template = C.load_base(args.model)
    data = C.make_data(tok, template, s)
    n = base.config.n_layers
    layer_set = [n // 3, 2 * n // 3, n] if not args.quick else [n // 3, n]
    k_set = [1, 5, 10, 20] if not args.quick else [1, 10]
    results: dict[tuple[int, int], dict] = {}
    reused = reuse_zero_init(Path(args.out), n) if not args.quick else None
    for L in layer_set:
        results[(L, 10)] = reused if L == n and reused else run(base, tok, template, data, s, L, 10)
    for K in k_set:
        if (n // 3, K) not in results:
            results[(n // 3, K)] = run(base, tok, template, data, s, n // 3, K)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, key, label in (
        (axes[0], [results[(L, 10)] for L in layer_set], "L", "adapted layers L (K=10)"),
        (axes[1], [results[(n // 3, K)] for K in k_set], "K", f"prompt length K (L={n // 3})"),
    ):
        xs = [r[key] for r in sweep]
        ax.plot(xs, [r["val"] for r in sweep], "o-", color="tab:blue", label="held-out loss")
        ax.axhline(sweep[0]["val0"], color="gray", ls="--", label="frozen base")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
        ax.set_xticks(xs)
        ax2 = ax.twinx()
        ax2.plot(xs, [100 * r["mc_acc"] for r in sweep], "s--", color="tab:orange", label="Alpaca-MC acc %")
        ax2.set_ylabel("Alpaca-MC accuracy %")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: adapted layers and prompt length")
    fig.tight_layout()
    fig.savefig(out / "layers_and_length.png", dpi=110)

    paper = {10: "55.95", 20: "73.36", 30: "83.85"}
    rows = [
        [
            r["L"],
            r["K"],
            r["trainable"],
            r["val0"],
            r["val"],
            100 * r["mc_acc"],
            paper.get(r["L"], "") if r["K"] == 10 else "",
            round(r["seconds"]),
        ]
        for r in results.values()
    ]
    body = C.md_table(
        [
            "L",
            "K",
            "trainable params",
            "held-out loss @0",
            "held-out loss final",
            "Alpaca-MC acc %",
            "paper SQA acc (L, K=10)",
            "train s",
        ],
        rows,
    )
    body += (
        f"\nlr {LR}, {s.epochs:g} epochs, warm-up 2 steps then cosine. `held-out loss @0` is the frozen base "
        "(zero-init gates). The paper's L column is for LLaMA-7B's 32 layers (10/20/30 of 32). "
        "The L=30 row is zero_init.py's zero-init run (identical; its train s includes 4 extra evaluations). "
        "Plot: `layers_and_length.png`.\n"
    )
    C.write_result(
        out,
        "layers_and_length",
        "Adapted layers and prompt length",
        s,
        data,
        body,
        {f"L{L}_K{K}": r for (L, K), r in results.items()},
    )


if __name__ == "__main__":
    main()
