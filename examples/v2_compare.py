"""LLaMA-Adapter V1 vs V2 on the same budget, and V2 joint (Alpaca + Flickr captions) training.

    python examples/v2_compare.py --out runs/v2_compare          # ~10 min on 2 busy CPU cores

SmolLM2-135M-Instruct, one seed, a CPU-sized budget (default 20 steps of batch 4, max_len 128, one
thread; each step is a forward + backward through all 30 layers, 6-12 s on a shared core):

1. V1: adaption prompts + zero-init gates on Alpaca (`alpaca_en_demo.json`, a fixed held-out split).
2. V2: the same plus bias/scale on every linear and trainable RMSNorms (`--bias-scale --train-norms`).
3. Joint: V2 options + early fusion (`--visual-layers`) + visual-query blocks over EfficientNet-Lite0
   patch tokens, trained on Alpaca and Flickr8k captions mixed in one run (`--data a.json,b.jsonl`),
   half and half (as many Alpaca rows as captions, so the captions are not 6% of the rows).
   Reported: held-out Alpaca loss, and held-out caption loss with the image, with no image
   (has_image False) and for the frozen base.

Every run goes through `train.finetune` (what `llama-adapter finetune` calls); held-out losses are
recomputed from the saved adapters. Writes a markdown table to examples/results/v2.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from llama_adapter.adapter import load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.data import InstructionDataset, batch_indices, collate, load_examples, split_holdout
from llama_adapter.multimodal import (
    example_visuals,
    flickr8k_to_jsonl,
    load_image_encoder,
    load_image_examples,
    uses_tokens,
    visual_make_ctx,
)
from llama_adapter.tokenizer import load_tokenizer
from llama_adapter.train import TrainArgs, evaluate_loss, finetune

ROOT = Path(__file__).resolve().parents[1]


def cli_command(args: TrainArgs) -> str:
    """The `llama-adapter finetune` command line that runs the same training as `finetune(args)`."""
    default = TrainArgs()
    parts = ["llama-adapter finetune"]
    for f in fields(args):
        v = getattr(args, f.name)
        if f.name == "extra" or v == getattr(default, f.name) or v is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


class HeldOut:
    """Held-out losses of saved adapters over ONE loaded base (loading SmolLM2 from its GGUF costs
    seconds each time): `load_adapter` wraps the base in place and `detach_base` restores it."""

    def __init__(self, model_name: str) -> None:
        self.base = load_model(model_name)
        self.tok = load_tokenizer(self.base.config.extra["tokenizer"])

    def loss(self, run: Path, data: Path, *, images: str = "none", cache: Path | None = None) -> float:
        """Response-token loss on `data` of the adapter saved in `run`; images: "image" (each row's
        own), "none" (has_image False) or "frozen" (the base alone, with the run's template)."""
        meta = json.loads((run / "adapter_config.json").read_text())
        model: Any = self.base if images == "frozen" else load_adapter(self.base, run)
        try:
            exs = load_image_examples(data) if data.suffix == ".jsonl" else load_examples(data)
            vis, make_ctx = None, None
            cfg = meta["adapter"]
            if images != "frozen" and cfg["visual_dim"]:
                make_ctx = visual_make_ctx(model)
                if images == "image":
                    enc = load_image_encoder(cfg["image_encoder"])
                    vis = example_visuals(exs, enc, cache, tokens=uses_tokens(model.adapter_config))
            ds = InstructionDataset(exs, self.tok, meta["template"], meta["train"]["max_len"], visual=vis)
            order = batch_indices(ds.lengths, 4, shuffle=False)
            return evaluate_loss(
                model, [collate([ds[i] for i in b], self.tok.pad_id) for b in order], make_ctx=make_ctx
            )
        finally:
            if model is not self.base:
                model.detach_base()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared/data/alpaca/alpaca_en_demo.json"))
    ap.add_argument("--flickr", default=str(ROOT.parent / "shared/data/flickr8k_1k"))
    ap.add_argument("--out", default="runs/v2_compare")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--adapter-layers", type=int, default=30)
    ap.add_argument("--n-val", type=int, default=24, help="held-out Alpaca examples")
    ap.add_argument("--n-images", type=int, default=40, help="Flickr training images (one caption each)")
    ap.add_argument("--n-val-images", type=int, default=16)
    ap.add_argument("--visual-layers", type=int, default=10, help="early fusion: images reach the first N adapted")
    ap.add_argument("--visual-query-blocks", type=int, default=2)
    ap.add_argument("--visual-query-dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v2-lrs", default="", help="extra V2 runs at these lrs, comma-separated (each ~1/3 more time)")
    ap.add_argument("--results", default=str(ROOT / "examples/results/v2.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out).resolve()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # Fixed Alpaca split: the same held-out examples for every run.
    examples = load_examples(a.alpaca)
    train_ex, val_ex = split_holdout(examples, a.n_val / len(examples), seed=0)
    alpaca_train, alpaca_val = data / "alpaca_train.json", data / "alpaca_val.json"
    alpaca_train.write_text(json.dumps(train_ex))
    alpaca_val.write_text(json.dumps(val_ex))
    # Flickr: one caption per training image; held-out images with their first caption.
    tr_jsonl, va_jsonl = flickr8k_to_jsonl(Path(a.flickr) / "captions.csv", Path(a.flickr) / "images", data / "flickr")
    seen: set[str] = set()
    caps = []
    for ex in load_image_examples(tr_jsonl):
        if ex["image"] not in seen and len(seen) < a.n_images:
            seen.add(ex["image"])
            caps.append({"image": ex["image"], "instruction": ex["instruction"], "output": ex["output"]})
    val_caps = [
        {"image": ex["image"], "instruction": ex["instruction"], "output": ex["output"]}
        for ex in load_image_examples(va_jsonl)[: a.n_val_images]
    ]
    flickr_train, flickr_val = data / "flickr_train.jsonl", data / "flickr_val.jsonl"
    flickr_train.write_text("".join(json.dumps(r) + "\n" for r in caps))
    alpaca_joint = data / "alpaca_joint.json"  # as many Alpaca rows as captions (a fixed random subset)
    alpaca_joint.write_text(json.dumps(random.Random(0).sample(train_ex, len(caps))))
    flickr_val.write_text("".join(json.dumps(r) + "\n" for r in val_caps))
    cache = out / "features"

    # No evaluation inside fit (val_fraction 0): every held-out loss is computed once afterwards from
    # the saved adapter, and the frozen base's once for all runs (CPU time is the budget here).
    common = dict(model=a.model, max_steps=a.steps, schedule_steps=a.steps, batch_size=a.batch_size,
                  max_len=a.max_len, lr=a.lr, warmup_steps=max(1, a.steps // 5), val_fraction=0.0,
                  save_every=10**6, seed=0,
                  adapter_layers=a.adapter_layers)  # fmt: skip
    runs = {
        "V1 (prompts + gates)": TrainArgs(data=str(alpaca_train), out=str(out / "v1"), **common),
        "V2 (+ bias/scale, norms)": TrainArgs(
            data=str(alpaca_train), out=str(out / "v2"), bias_scale=True, train_norms=True, **common
        ),
        **{
            f"V2 (+ bias/scale, norms), lr {lr:g}": TrainArgs(
                data=str(alpaca_train),
                out=str(out / f"v2_lr{lr:g}"),
                bias_scale=True,
                train_norms=True,
                **{**common, "lr": lr},
            )  # fmt: skip
            for lr in (float(x) for x in a.v2_lrs.split(",") if x.strip())
        },
        "V2 joint (Alpaca + captions, early fusion, visual query)": TrainArgs(
            data=f"{alpaca_joint},{flickr_train}",
            out=str(out / "joint"),
            bias_scale=True,
            train_norms=True,
            image_encoder="efficientnet-lite0",
            feature_cache=str(cache),
            visual_layers=a.visual_layers,
            visual_query_blocks=a.visual_query_blocks,
            visual_query_dim=a.visual_query_dim,
            **common,
        ),
    }
    rows = []
    frozen: dict[str, float] = {}
    held_out: HeldOut | None = None
    for name, targs in runs.items():
        t0 = time.time()
        res = finetune(targs)
        secs = time.time() - t0
        run = Path(targs.out)
        if held_out is None:  # once, after the first run (the frozen losses use its template)
            held_out = HeldOut(a.model)
            frozen["text"] = held_out.loss(run, alpaca_val, images="frozen")
            frozen["caption"] = held_out.loss(run, flickr_val, images="frozen")
        n_params = json.loads((run / "adapter_config.json").read_text())["trainable_parameters"]
        row = {"name": name, "cmd": cli_command(targs), "secs": secs, "params": n_params,
               "train_first": res.train_losses[0], "train_last5": sum(res.train_losses[-5:]) / 5,
               "text0": frozen["text"], "text": held_out.loss(run, alpaca_val)}  # fmt: skip
        if targs.image_encoder:
            row["cap_image"] = held_out.loss(run, flickr_val, images="image", cache=cache)
            row["cap_none"] = held_out.loss(run, flickr_val, images="none")
            row["cap_frozen"] = frozen["caption"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = time.time() - t_start
    write_results(Path(a.results), rows, a, total, len(train_ex), len(val_ex), len(caps), len(val_caps))
    return 0


def write_results(path: Path, rows: list[dict], a: argparse.Namespace, total: float, n_train: int, n_val: int,
                  n_caps: int, n_val_caps: int) -> None:  # fmt: skip
    lines = [
        "# LLaMA-Adapter V1 vs V2, and V2 joint training (tiny CPU budget)",
        "",
        f"SmolLM2-135M-Instruct, {a.steps} steps x batch {a.batch_size}, max_len {a.max_len}, lr {a.lr}, "
        f"adapter_len 10, adapter_layers {a.adapter_layers}, seed 0, fp32 on CPU ({a.threads} thread). Alpaca: "
        f"`alpaca_en_demo.json`, {n_train} train / {n_val} held-out examples (fixed split). Flickr8k: {n_caps} train "
        f"images (first caption each), {n_val_caps} held-out images. Loss = mean cross-entropy per response token. "
        f"Total wall time {total / 60:.1f} min. Produced by `python examples/v2_compare.py`.",
        "",
        "| run | trainable params | train loss: step 1 / mean of last 5 | held-out Alpaca loss: frozen base -> "
        "adapter | held-out caption loss: image / no image / frozen base | train time |",
        "|---|---:|---|---|---|---:|",
    ]
    for r in rows:
        cap = "-"
        if "cap_image" in r:
            cap = f"{r['cap_image']:.3f} / {r['cap_none']:.3f} / {r['cap_frozen']:.3f}"
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['train_first']:.3f} / {r['train_last5']:.3f} | "
            f"{r['text0']:.3f} -> {r['text']:.3f} | {cap} | {r['secs']:.0f} s |"
        )
    lines += ["", "Commands (what each run passed to `finetune`):", ""]
    lines += [f"- {r['name']}: `{r['cmd']}`" for r in rows]
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
