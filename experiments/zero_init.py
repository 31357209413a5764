"""Zero-init vs random-init gates (paper: 84.04 vs 40.77 ScienceQA val accuracy).

Same data, schedule and prompt init per seed; only the gate's starting value differs: 0 (the paper's
zero-init attention) or tanh(N(0, 1)) per head ("random init"). Held-out loss curves (mean over seeds)
in one figure; final held-out loss and Alpaca-MC accuracy, mean +- std and per seed, plus the frozen base.

    .venv/bin/python experiments/zero_init.py [--quick]
"""

from __future__ import annotations

import common as C


def plan(s: C.Setup) -> list[C.Run]:
    return [s.run(gate=g, seed=k) for g in ("zero", "random") for k in s.seeds]


def main() -> None:
    s = C.Setup.for_args(C.parser(__doc__).parse_args())
    results = C.run_all(plan(s), s.out)
    base = C.base_scores(s)
    groups = C.grouped(results)
    rows = [["frozen base (no adapter)", f"{base['val']:.4f}", "", "", f"{100 * base['mc_acc']:.1f}", "", ""]]
    for name, rs in groups.items():
        rows.append(
            [
                "zero-init gates" if "random" not in name else "random-init gates",
                C.pm([r["val0"] for r in rs]),
                C.pm([r["val"] for r in rs]),
                C.per_seed([r["val"] for r in rs]),
                C.pm([r["mc_acc"] for r in rs], 1, 100),
                C.per_seed([r["mc_acc"] for r in rs], 1, 100),
                C.pm([r["train_s"] for r in rs], 0),
            ]
        )
    body = C.md_table(
        [
            "run",
            "held-out loss @0",
            "held-out loss final",
            "per seed",
            "Alpaca-MC acc %",
            "per seed",
            "train s",
        ],
        rows,
    )
    first = results[0]
    body += (
        f"\nlr {first['lr']:g}, {first['steps']} steps ({first['steps_per_epoch']} an epoch), 10% warm-up then "
        "cosine; random gates: N(0, 1) drawn with seed 1000 + seed. Loss curves: `zero_init_loss.png`.\n"
    )
    body += C.estimate(results, plan(C.full_setup(s))) if s.quick else ""
    plot(groups, s)
    C.write_result(s, "zero_init", "Zero-init vs random-init gating", body, {"results": results, "base": base})


def plot(groups: dict[str, list[dict]], s: C.Setup) -> None:
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, rs), color in zip(groups.items(), ("tab:blue", "tab:red")):
        steps = [st for st, _ in rs[0]["val_curve"]]
        curves = [[v for _, v in r["val_curve"]] for r in rs]
        mean = [C.mean_std(list(col))[0] for col in zip(*curves)]
        std = [C.mean_std(list(col))[1] for col in zip(*curves)]
        ax.plot(steps, mean, "o-", color=color, label=f"{name}: held-out (mean of {len(rs)} seeds)")
        ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=color, alpha=0.2)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title("Zero-init vs random-init gates (SmolLM2-135M, L=30, K=10)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "zero_init_loss.png", dpi=110)


if __name__ == "__main__":
    main()
