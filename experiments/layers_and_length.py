"""Adapted layers L and prompt length K (paper, ScienceQA val: L = 10/20/30 -> 55.95/73.36/83.85).

Sweep 1: top L of the 30 layers adapted, K = 10. Sweep 2: K in {1, 5, 10, 20} with L = 10 (the
cheapest L: only the top 10 layers need a backward pass). 3 seeds each; the L=30, K=10 runs are
zero_init.py's zero-init runs (same runs, cached: trained once).

    .venv/bin/python experiments/layers_and_length.py [--quick]
"""

from __future__ import annotations

import common as C

PAPER = {10: "55.95", 20: "73.36", 30: "83.85"}


def sweeps(s: C.Setup) -> tuple[list[int], list[int]]:
    return ([10, 30], [1, 10]) if s.quick else ([10, 20, 30], [1, 5, 10, 20])


def plan(s: C.Setup) -> list[C.Run]:
    layers, lengths = sweeps(s)
    configs = [(L, 10) for L in layers] + [(10, K) for K in lengths if K != 10]
    return [s.run(layers=L, adapter_len=K, seed=k) for L, K in configs for k in s.seeds]


def main() -> None:
    s = C.Setup.for_args(C.parser(__doc__).parse_args())
    results = C.run_all(plan(s), s.out)
    base = C.base_scores(s)
    by = {(r["run"]["layers"], r["run"]["adapter_len"]): rs for rs in C.grouped(results).values() for r in rs[:1]}
    layers, lengths = sweeps(s)
    rows = []
    for (L, K), rs in sorted(by.items(), key=lambda kv: (kv[0][1] != 10, kv[0])):
        rows.append(
            [
                L,
                K,
                rs[0]["trainable"],
                C.pm([r["val"] for r in rs]),
                C.per_seed([r["val"] for r in rs]),
                C.pm([r["mc_acc"] for r in rs], 1, 100),
                C.per_seed([r["mc_acc"] for r in rs], 1, 100),
                PAPER.get(L, "") if K == 10 else "",
                C.pm([r["train_s"] for r in rs], 0),
            ]
        )
    body = C.md_table(
        [
            "L",
            "K",
            "trainable params",
            "held-out loss",
            "per seed",
            "Alpaca-MC acc %",
            "per seed",
            "paper SQA acc (L, K=10)",
            "train s",
        ],
        rows,
    )
    first = results[0]
    body += (
        f"\nFrozen base: held-out loss {base['val']:.4f}, Alpaca-MC {100 * base['mc_acc']:.1f}%. lr {first['lr']:g}, "
        f"{first['steps']} steps, 10% warm-up then cosine. The paper's L is of LLaMA-7B's 32 layers (10/20/30 of 32). "
        "Plot: `layers_and_length.png`.\n"
    )
    body += C.estimate(results, plan(C.full_setup(s))) if s.quick else ""
    plot(by, layers, lengths, base, s)
    raw = {"results": results, "base": base}
    C.write_result(s, "layers_and_length", "Adapted layers and prompt length", body, raw)


def plot(by: dict, layers: list[int], lengths: list[int], base: dict, s: C.Setup) -> None:
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, label in (
        (axes[0], [(L, 10) for L in layers], "adapted layers L (K=10)"),
        (axes[1], [(10, K) for K in lengths], "prompt length K (L=10)"),
    ):
        xs = [L if label.startswith("adapted") else K for L, K in keys]
        stats = [C.mean_std([r["val"] for r in by[k]]) for k in keys]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[d for _, d in stats], fmt="o-", capsize=3, label="held-out loss")
        ax.axhline(base["val"], color="gray", ls="--", label="frozen base")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (mean +- std over seeds)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: adapted layers and prompt length")
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "layers_and_length.png", dpi=110)


if __name__ == "__main__":
    main()
