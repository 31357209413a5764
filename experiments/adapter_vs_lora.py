"""Adapter vs LoRA vs full fine-tuning on the same model, data, packed batches and schedule.

Each run trains in its own process (so peak RSS is that method's alone), through the same packed
trainer (`llama_adapter.train.fit` trains whatever requires grad):
- adapter: ours, L=30, K=10, zero-init gates (zero_init.py's runs, cached);
- LoRA: r=8, alpha=16 on the query and value projections of every layer (the LoRA paper's setting;
  `common.LoRALinear`, as peft's LoRA: A kaiming-uniform, B zero);
- full: every weight of the model trainable.
Learning rates are common defaults for each method, not tuned here: adapter 1e-2, LoRA 1e-3, full 5e-5.

    .venv/bin/python experiments/adapter_vs_lora.py [--quick]
"""

from __future__ import annotations

import common as C

METHODS = ("adapter", "lora", "full")


def plan(s: C.Setup) -> list[C.Run]:
    return [s.run(method=m, seed=k) for m in METHODS for k in s.seeds]


def main() -> None:
    s = C.Setup.for_args(C.parser(__doc__).parse_args())
    results = C.run_all(plan(s), s.out)
    base = C.base_scores(s)
    groups = {m: [r for r in results if r["run"]["method"] == m] for m in METHODS}
    epochs = results[0]["run"]["epochs"]
    rows = [
        [
            m,
            rs[0]["trainable"],
            f"{100 * rs[0]['trainable'] / rs[0]['total_params']:.3f}%",
            C.pm([r["train_s"] / epochs for r in rs], 0),
            C.pm([r["train_peak_rss_mb"] for r in rs], 0),
            C.pm([r["val"] for r in rs]),
            C.per_seed([r["val"] for r in rs]),
            C.pm([r["mc_acc"] for r in rs], 1, 100),
            C.per_seed([r["mc_acc"] for r in rs], 1, 100),
        ]
        for m, rs in groups.items()
    ]
    body = C.md_table(
        [
            "method",
            "trainable params",
            "% of base",
            "s / epoch",
            "peak RSS MB (training)",
            "held-out loss",
            "per seed",
            "Alpaca-MC acc %",
            "per seed",
        ],
        rows,
    )
    speed = {m: C.mean_std([r["train_s"] for r in rs])[0] for m, rs in groups.items()}
    body += (
        f"\nFrozen base: held-out loss {base['val']:.4f}, Alpaca-MC {100 * base['mc_acc']:.1f}%. lr: "
        + ", ".join(f"{m} {rs[0]['lr']:g}" for m, rs in groups.items())
        + f"; 10% warm-up then cosine. Full fine-tuning takes {speed['full'] / speed['adapter']:.2f}x the adapter's "
        f"time per epoch, LoRA {speed['lora'] / speed['adapter']:.2f}x. s/epoch excludes evaluation; peak RSS is the "
        "kernel's high-water mark from the start of training (frozen weights + gradients + optimizer state + "
        "activations). Train curves: `adapter_vs_lora.png`.\n"
    )
    body += C.estimate(results, plan(C.full_setup(s))) if s.quick else ""
    plot(groups, base, s)
    raw = {"results": results, "base": base}
    C.write_result(s, "adapter_vs_lora", "Adapter vs LoRA vs full fine-tuning", body, raw)


def plot(groups: dict[str, list[dict]], base: dict, s: C.Setup) -> None:
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, rs in groups.items():
        curves = list(zip(*[r["train_curve"] for r in rs]))
        mean = [C.mean_std(list(c))[0] for c in curves]
        ax.plot(range(1, len(mean) + 1), mean, "-", label=f"{m} (lr {rs[0]['lr']:g}), mean of {len(rs)} seeds")
    ax.axhline(base["val"], color="gray", ls="--", label="frozen base, held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Adapter vs LoRA vs full fine-tuning (SmolLM2-135M)")
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "adapter_vs_lora.png", dpi=110)


if __name__ == "__main__":
    main()
