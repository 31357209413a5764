"""Over-fitting: many epochs on a small training set, held-out loss and accuracy per epoch.

The paper reports that the adapter keeps improving held-out accuracy for far more epochs than a
fully fine-tuned model would tolerate (its Table: 15/30/60 epochs -> 81.13/83.85/83.97 on
ScienceQA val, lower train loss each time). Here: 8 examples, 6 epochs, adapter L=10 (the
cheapest of the layer sweep), K=10; one `fit` call per epoch at a constant learning rate (AdamW
state restarts each epoch: `fit` has no per-epoch hook); held-out loss after every epoch,
Alpaca-MC accuracy every 2 epochs.

    .venv/bin/python experiments/overfitting.py [--quick]
"""

from __future__ import annotations

from pathlib import Path

import common as C
import torch

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.train import TrainArgs, fit

LR = 1e-2


def main() -> None:
    args = C.parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    s = C.Setup.for_args(args)
    base, tok, template = C.load_base(args.model)
    data = C.make_data(tok, template, s)
    n_small, epochs = (8, 6) if not args.quick else (4, 2)
    small = data.train.items[:n_small]
    mc = data.mc
    torch.manual_seed(0)
    L = base.config.n_layers // 3  # the cheapest adapter of the layer sweep: CPU time is scarce here
    m = AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=L))
    rows = [[0, "", C.held_out_loss(m, data.val, tok.pad_id), 100 * C.mc_accuracy(m, tok, mc, template)]]
    C.log(f"epoch 0: {rows[-1]}")
    for ep in range(1, epochs + 1):
        targs = TrainArgs(
            lr=LR,
            min_lr=LR,
            warmup_steps=0,
            epochs=1,
            batch_size=s.batch_size,
            eval_every=10**9,
            save_every=10**9,
            seed=ep,
            max_len=s.max_len,
        )
        res = fit(m, small, [], targs, pad_id=tok.pad_id, progress=False)
        train_loss = C.held_out_loss(m, small, tok.pad_id)
        acc = 100 * C.mc_accuracy(m, tok, mc, template) if ep % 2 == 0 or ep == epochs else ""
        rows.append([ep, train_loss, C.held_out_loss(m, data.val, tok.pad_id), acc])
        C.log(f"epoch {ep}: {rows[-1]} ({res.steps} steps)")
    m.detach_base()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r[0] for r in rows[1:]], [r[1] for r in rows[1:]], "o-", label="train-set loss (8 examples)")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "s-", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    acc_rows = [r for r in rows if r[3] != ""]
    ax2.plot([r[0] for r in acc_rows], [r[3] for r in acc_rows], "^--", color="tab:green", label="Alpaca-MC acc %")
    ax2.set_ylabel(f"Alpaca-MC accuracy % ({len(mc)} questions)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"Adapter (L={L}, K=10) on {n_small} examples, {epochs} epochs")
    fig.tight_layout()
    fig.savefig(out / "overfitting.png", dpi=110)
    body = C.md_table(["epoch", "train-set loss", "held-out loss", f"Alpaca-MC acc % ({len(mc)} q)"], rows)
    body += (
        f"\n{n_small} training examples, batch {s.batch_size}, constant lr {LR}; epoch 0 = frozen base. "
        "Alpaca-MC every 2 epochs (CPU time). Plot: `overfitting.png`.\n"
    )
    C.write_result(out, "overfitting", "Over-fitting: many epochs on a small set", s, data, body, {"rows": rows})


if __name__ == "__main__":
    main()
