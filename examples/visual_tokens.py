"""Do more visual tokens help OCR? The visual-token study of the multimodal benchmarks issue.

SmolLM2-135M-Instruct + the frozen EfficientNet-Lite0, one adapter per configuration trained on the
same mixed OCR + MME training set (`data make-ocr` / `make-mme`, seeded) with the same optimizer budget,
then scored with `evaluate --task ocr` (VQA accuracy, with the no-text control photos) and
`--task mme` (accuracy, accuracy+, score):

    V1        one projected global feature (1,752 numbers, 4 scales) added to every adaption prompt
    V2-early  the same feature fused only into the first adapted layer (V2's early fusion)
    VQ-1/10/49  V2's visual-query blocks over the 7x7 x 1280 patch map, giving 1, 10 or 49 visual
              tokens (adapter_len = the number of queries: query i is added to prompt i)

    .venv/bin/python examples/visual_tokens.py                       # 2 seeds, ~45 min on 2 CPU threads
    .venv/bin/python examples/visual_tokens.py --quick               # a smoke run (minutes)

Runs are cached in --out/<config>-s<seed>.json, so an interrupted study resumes where it stopped.
The table goes to examples/results/visual_tokens.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llama_adapter.evaluate import EvalArgs, make_mme, make_ocr, run
from llama_adapter.train import TrainArgs, finetune

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parents[1] / "shared" / "data" / "flickr8k_1k" / "images"
CONFIGS: dict[str, dict[str, Any]] = {
    "V1": {},
    "V2-early": {"visual_layers": 1},
    "VQ-1": {"visual_query_blocks": 2, "visual_query_dim": 256, "adapter_len": 1},
    "VQ-10": {"visual_query_blocks": 2, "visual_query_dim": 256, "adapter_len": 10},
    "VQ-49": {"visual_query_blocks": 2, "visual_query_dim": 256, "adapter_len": 49},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_sets(root: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    ocr, mme = root / "ocr", root / "mme"
    if not (ocr / "test.jsonl").is_file():
        make_ocr(ocr, n_train=a.ocr_train, n_test=a.test_images, seed=0, photos=PHOTOS, progress=False)
    if not (mme / "test.jsonl").is_file():
        make_mme(mme, n_train=a.mme_train, n_test=a.test_images, seed=0, photos=PHOTOS, progress=False)
    return ocr, mme


def scores(adapter: str | None, ocr: Path, mme: Path) -> dict[str, Any]:
    common = dict(adapter=adapter, batch_size=16, progress=False, weights="fp32")
    o = run(EvalArgs(task="ocr", data=str(ocr / "test.jsonl"), max_new_tokens=6, **common))
    m = run(EvalArgs(task="mme", data=str(mme / "test.jsonl"), max_new_tokens=3, **common))
    return {
        "ocr": o["accuracy"], "ocr_control": o["control_accuracy"],
        "ocr_word": o["groups"]["subtask"].get("word", {}).get("accuracy"),
        "ocr_number": o["groups"]["subtask"].get("number", {}).get("accuracy"),
        "mme_acc": m["accuracy"], "mme_score": m["total_score"], "mme_max": m["max_score"],
        "mme_subtasks": {k: v["score"] for k, v in m["subtasks"].items()},
    }  # fmt: skip


def train_one(name: str, seed: int, ocr: Path, mme: Path, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / f"{name}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    res = finetune(
        TrainArgs(
            data=f"{ocr / 'train.jsonl'},{mme / 'train.jsonl'}", out=str(run_dir), image_encoder="efficientnet-lite0",
            feature_cache=str(out / "feature_cache"), adapter_layers=a.layers, epochs=a.epochs, lr=a.lr,
            warmup_steps=a.warmup, batch_tokens=a.batch_tokens, val_fraction=0.0, eval_every=10**6,
            save_every=10**6, seed=seed, **CONFIGS[name],
        )
    )  # fmt: skip
    train_s = time.time() - t0
    rec = {"config": name, "seed": seed, "steps": res.steps, "first_loss": res.train_losses[0],
           "last_loss": statistics.mean(res.train_losses[-5:]), "train_s": train_s,
           **scores(str(run_dir), ocr, mme), "eval_s": time.time() - t0 - train_s}  # fmt: skip
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return rec


def col(rs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in rs]


def fmt(xs: list[float], scale: float = 100.0, nd: int = 1) -> str:
    xs = [scale * x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{nd}f}"
    return f"{statistics.mean(xs):.{nd}f} ± {statistics.stdev(xs):.{nd}f}"


def write_table(recs: list[dict[str, Any]], base: dict[str, Any], a: argparse.Namespace, path: Path) -> str:
    lines = [
        "| configuration | visual tokens | OCR acc % | OCR, no-text control % | OCR words / numbers % | "
        "MME acc % | MME score | train loss (last 5 steps) | per seed: OCR %, MME score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| text-only base (no adapter) | 0 | {fmt([base['ocr']])} | {fmt([base['ocr_control']])} | "
        f"{fmt([base['ocr_word']])} / {fmt([base['ocr_number']])} | {fmt([base['mme_acc']])} | "
        f"{base['mme_score']:.0f} / {base['mme_max']} | - | - |",
    ]
    tokens = {"V1": "1 (global)", "V2-early": "1 (global)", "VQ-1": "1", "VQ-10": "10", "VQ-49": "49"}
    for name in CONFIGS:
        rs = sorted((r for r in recs if r["config"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        per = "; ".join(f"s{r['seed']}: {100 * r['ocr']:.1f}, {r['mme_score']:.0f}" for r in rs)
        c = {k: fmt(col(rs, k)) for k in ("ocr", "ocr_control", "ocr_word", "ocr_number", "mme_acc")}
        mme = f"{fmt(col(rs, 'mme_score'), 1.0, 0)} / {rs[0]['mme_max']}"
        lines.append(
            f"| {name} | {tokens[name]} | {c['ocr']} | {c['ocr_control']} | {c['ocr_word']} / {c['ocr_number']} | "
            f"{c['mme_acc']} | {mme} | {fmt(col(rs, 'last_loss'), 1.0, 3)} | {per} |"
        )
    table = "\n".join(lines)
    wall = sum(r["train_s"] + r["eval_s"] for r in recs) / 60
    path.write_text(
        "# Do more visual tokens help OCR?\n\n"
        f"Command: `.venv/bin/python examples/visual_tokens.py{' --quick' if a.quick else ''}` "
        f"({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU threads, {wall:.0f} min of training and "
        "evaluation in all).\n\n"
        f"SmolLM2-135M-Instruct (frozen) + EfficientNet-Lite0 (frozen, ImageNet weights). Every configuration "
        f"trains on the same {a.ocr_train} OCR images + {a.mme_train} MME images ({2 * a.mme_train} yes/no "
        f"questions), {a.epochs:g} epoch(s) of packed steps of ~{a.batch_tokens} tokens, AdamW lr {a.lr:g} "
        f"({a.warmup} warm-up steps, cosine), top {a.layers} layers adapted, K=10 prompts unless the "
        f"configuration sets K; seeds {', '.join(map(str, a.seed_list))} (mean ± std over seeds). Test: "
        f"{a.test_images} OCR images with unseen words and numbers (VQA accuracy; the control asks the "
        f"same question about the same photo without the text) and {a.test_images} MME images "
        "(two opposite yes/no questions each; score = acc + acc+ per subtask, 200 per subtask).\n\n"
        f"{table}\n"
    )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/visual_tokens")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--ocr-train", type=int, default=600)
    ap.add_argument("--mme-train", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="12+8 training images, 8 test images, one seed")
    ap.add_argument("--results", default=str(HERE / "results" / "visual_tokens.md"))
    a = ap.parse_args()
    if a.quick:
        a.ocr_train, a.mme_train, a.test_images, a.epochs, a.seeds = 12, 8, 8, 1.0, "0"
        a.out, a.results = a.out + "-quick", str(Path(a.out + "-quick") / "visual_tokens.md")
    a.seed_list = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ocr, mme = make_sets(out / "data", a)
    base_file = out / "base.json"
    if not base_file.is_file():
        log("text-only base")
        base_file.write_text(json.dumps(scores(None, ocr, mme)))
    base = json.loads(base_file.read_text())
    recs = []
    for name in a.configs.split(","):
        for seed in a.seed_list:
            f = out / f"{name}-s{seed}.json"
            if not f.is_file():
                log(f"{name} seed {seed}")
                f.write_text(json.dumps(train_one(name, seed, ocr, mme, a, out)))
            recs.append(json.loads(f.read_text()))
            log(f"{name} seed {seed}: OCR {100 * recs[-1]['ocr']:.1f}% MME {recs[-1]['mme_score']:.0f}")
    print(write_table(recs, base, a, Path(a.results)))


if __name__ == "__main__":
    main()
