"""Do more visual tokens help OCR? The visual-token study of the multimodal benchmarks issue.

SmolLM2-135M-Instruct + the frozen EfficientNet-Lite0, one adapter per configuration trained on the
same mixed OCR + MME training set (`data make-ocr` / `make-mme`, seeded) with the same optimizer budget,
then scored with `evaluate --task ocr` (VQA accuracy, with the no-text control photos) and
`--task mme` (accuracy, accuracy+, score). Each configuration is also trained on its own on Flickr
captions (--captions photos x 1 caption) and scored with CIDEr-D / BLEU-4, photo vs grey image:
captioning is what this adapter learns at a CPU budget, so it is where the number of tokens can show.

    V1        one projected global feature (1,752 numbers, 4 scales) added to every adaption prompt
    V2-early  the same feature fused only into the first adapted layer (V2's early fusion)
    VQ-1/10/49  V2's visual-query blocks over the 7x7 x 1280 patch map, giving 1, 10 or 49 visual
              tokens (adapter_len = the number of queries: query i is added to prompt i)

    .venv/bin/python examples/visual_tokens.py                       # 3 seeds + captions, ~3 h on 2 CPU threads
    .venv/bin/python examples/visual_tokens.py --quick               # a smoke run (minutes)

Runs are cached in --out/<config>-s<seed>.json (captions: cap-<config>-s<seed>.json), so an
interrupted study resumes where it stopped.
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
from PIL import Image

from llama_adapter.adapter import load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.evaluate import EvalArgs, make_mme, make_ocr, run
from llama_adapter.generate import SamplingParams, generate_text
from llama_adapter.loading import image_prompt_state
from llama_adapter.metrics import caption_scores
from llama_adapter.multimodal import CAPTION_INSTRUCTION, flickr8k_to_jsonl, load_image_examples
from llama_adapter.tokenizer import load_tokenizer, render_chat
from llama_adapter.train import TrainArgs, finetune

HERE = Path(__file__).resolve().parent
FLICKR = HERE.parents[1] / "shared" / "data" / "flickr8k_1k"
PHOTOS = FLICKR / "images"
MODEL = "smollm2-135m-instruct"
TOKENS = {"V1": "1 (global)", "V2-early": "1 (global)", "VQ-1": "1", "VQ-10": "10", "VQ-49": "49"}
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


def train_adapter(name: str, seed: int, run_dir: Path, a: argparse.Namespace, out: Path, **data: Any) -> Any:
    """Train configuration `name` afresh into `run_dir` with the study's shared budget; `data` adds the
    data-specific TrainArgs (data=, batch size or tokens, max length). Returns finetune's result."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return finetune(
        TrainArgs(
            out=str(run_dir), image_encoder="efficientnet-lite0", feature_cache=str(out / "feature_cache"),
            adapter_layers=a.layers, epochs=a.epochs, lr=a.lr, warmup_steps=a.warmup, val_fraction=0.0,
            eval_every=10**6, save_every=10**6, seed=seed, **CONFIGS[name], **data,
        )
    )  # fmt: skip


def train_one(name: str, seed: int, ocr: Path, mme: Path, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / f"{name}-s{seed}"
    t0 = time.time()
    data = f"{ocr / 'train.jsonl'},{mme / 'train.jsonl'}"
    res = train_adapter(name, seed, run_dir, a, out, data=data, batch_tokens=a.batch_tokens)
    train_s = time.time() - t0
    rec = {"config": name, "seed": seed, "steps": res.steps, "first_loss": res.train_losses[0],
           "last_loss": statistics.mean(res.train_losses[-5:]), "train_s": train_s,
           **scores(str(run_dir), ocr, mme), "eval_s": time.time() - t0 - train_s}  # fmt: skip
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return rec


# ------------------------------------------------------------------------------------------- captions
# OCR and MME test reading and yes/no perception; captioning is the task this adapter demonstrably
# learns on CPU (examples/results/flickr_caption.md), so it is where the number of visual tokens can show.
def caption_sets(root: Path, n_train: int) -> tuple[Path, list[dict[str, Any]]]:
    """`n_train` Flickr train photos x their first caption, and the 100 held-out photos with all 5 references."""
    train_jsonl, val_jsonl = flickr8k_to_jsonl(FLICKR / "captions.csv", PHOTOS, root)
    rows, seen = [], set()
    for ex in load_image_examples(train_jsonl):
        if ex["image"] not in seen and len(seen) < n_train:
            seen.add(ex["image"])
            rows.append({"image": str(Path(ex["image"]).resolve()), "instruction": ex["instruction"],
                         "output": ex["output"]})  # fmt: skip
    one = root / f"train_{n_train}x1.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return one, load_image_examples(val_jsonl)


def caption_scores_of(adapter: str | None, val: list[dict[str, Any]], with_grey: bool = False) -> list[dict[str, Any]]:
    """Greedy captions (20 new tokens) of the held-out photos: BLEU-4, CIDEr-D and the first caption; with
    `with_grey`, a second entry for the same model given a grey image in place of every photo."""
    base = load_model(MODEL)
    tok = load_tokenizer(base.config.extra["tokenizer"])
    model = load_adapter(base, adapter).eval() if adapter else base
    prompt = render_chat([{"role": "user", "content": CAPTION_INSTRUCTION}], "chatml", add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop=["<|im_end|>", "\n"])
    out = []
    for blank in (False, True) if with_grey else (False,):
        caps: list[str] = []
        with torch.inference_mode():
            for i in range(0, len(val), 20):
                chunk = val[i : i + 20]
                images = [Image.new("RGB", (224, 224), (128, 128, 128)) if blank else ex["image"] for ex in chunk]
                ctx = image_prompt_state(model, images) if adapter else None
                caps += generate_text(model, tok, [prompt] * len(chunk), params, ctx=ctx)
        s = caption_scores([c.replace("<|im_end|>", "").strip() for c in caps], [ex["references"] for ex in val])
        out.append({"bleu4": s["bleu4"], "cider": s["cider"], "sample": caps[0]})
    return out


def caption_one(name: str, seed: int, train: Path, val: list, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    run_dir = out / f"cap-{name}-s{seed}"
    t0 = time.time()
    res = train_adapter(name, seed, run_dir, a, out, data=str(train), batch_size=8, max_len=64)
    train_s = time.time() - t0
    img, grey = caption_scores_of(str(run_dir), val, with_grey=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"config": name, "seed": seed, "steps": res.steps, "last_loss": statistics.mean(res.train_losses[-5:]),
            "bleu4": img["bleu4"], "cider": img["cider"], "grey_bleu4": grey["bleu4"], "grey_cider": grey["cider"],
            "sample": img["sample"], "n_val": len(val), "train_s": train_s,
            "eval_s": time.time() - t0 - train_s}  # fmt: skip


def col(rs: list[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in rs]


def fmt(xs: list[float], scale: float = 100.0, nd: int = 1) -> str:
    xs = [scale * x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{nd}f}"
    return f"{statistics.mean(xs):.{nd}f} ± {statistics.stdev(xs):.{nd}f}"


def caption_table(caps: list[dict[str, Any]], base: dict[str, Any]) -> str:
    lines = [
        "| configuration | visual tokens | CIDEr-D | CIDEr-D, grey image | BLEU-4 % | train loss (last 5 steps) | "
        "per seed: CIDEr-D |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| text-only base (no adapter) | 0 | {fmt([base['cider']], 1.0, 3)} | - | {fmt([base['bleu4']])} | - | - |",
    ]
    for name in CONFIGS:
        rs = sorted((r for r in caps if r["config"] == name), key=lambda r: r["seed"])
        if rs:
            per = "; ".join(f"s{r['seed']}: {r['cider']:.3f}" for r in rs)
            lines.append(
                f"| {name} | {TOKENS[name]} | {fmt(col(rs, 'cider'), 1.0, 3)} | {fmt(col(rs, 'grey_cider'), 1.0, 3)} | "
                f"{fmt(col(rs, 'bleu4'))} | {fmt(col(rs, 'last_loss'), 1.0, 3)} | {per} |"
            )
    return "\n".join(lines)


def write_table(
    recs: list[dict[str, Any]], base: dict[str, Any], caps: list[dict[str, Any]], cap_base: dict[str, Any] | None,
    a: argparse.Namespace, path: Path,
) -> str:  # fmt: skip
    lines = [
        "| configuration | visual tokens | OCR acc % | OCR, no-text control % | OCR words / numbers % | "
        "MME acc % | MME score | train loss (last 5 steps) | per seed: OCR %, MME score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| text-only base (no adapter) | 0 | {fmt([base['ocr']])} | {fmt([base['ocr_control']])} | "
        f"{fmt([base['ocr_word']])} / {fmt([base['ocr_number']])} | {fmt([base['mme_acc']])} | "
        f"{base['mme_score']:.0f} / {base['mme_max']} | - | - |",
    ]
    for name in CONFIGS:
        rs = sorted((r for r in recs if r["config"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        per = "; ".join(f"s{r['seed']}: {100 * r['ocr']:.1f}, {r['mme_score']:.0f}" for r in rs)
        c = {k: fmt(col(rs, k)) for k in ("ocr", "ocr_control", "ocr_word", "ocr_number", "mme_acc")}
        mme = f"{fmt(col(rs, 'mme_score'), 1.0, 0)} / {rs[0]['mme_max']}"
        lines.append(
            f"| {name} | {TOKENS[name]} | {c['ocr']} | {c['ocr_control']} | {c['ocr_word']} / {c['ocr_number']} | "
            f"{c['mme_acc']} | {mme} | {fmt(col(rs, 'last_loss'), 1.0, 3)} | {per} |"
        )
    table = "\n".join(lines)
    wall = sum(r["train_s"] + r["eval_s"] for r in recs + caps) / 60
    captions = ""
    if caps and cap_base is not None:
        steps = caps[0]["steps"]
        captions = (
            "\n## Captions\n\n"
            f"Each configuration also trained on its own on {a.captions} Flickr photos x their first caption "
            f"({a.epochs:g} epoch(s), batches of 8 captions packed, {steps} steps, max length 64, the same lr, "
            f"layers and seeds), scored on the {caps[0]['n_val']} held-out photos: greedy captions of up to 20 "
            "tokens, CIDEr-D and BLEU-4 against all 5 references; the control gives the same adapter a grey "
            "image instead of the photo.\n\n"
            f"{caption_table(caps, cap_base)}\n"
        )
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
        f"{table}\n{captions}"
    )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/visual_tokens")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ocr-train", type=int, default=600)
    ap.add_argument("--mme-train", type=int, default=300)
    ap.add_argument("--test-images", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--captions", type=int, default=600, help="Flickr photos for the caption runs (0: none)")
    ap.add_argument("--quick", action="store_true", help="12+8 training images, 8 test images, one seed")
    ap.add_argument("--results", default=str(HERE / "results" / "visual_tokens.md"))
    a = ap.parse_args()
    if a.quick:
        a.ocr_train, a.mme_train, a.test_images, a.epochs, a.seeds = 12, 8, 8, 1.0, "0"
        a.captions = min(a.captions, 16)
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
    caps, cap_base = [], None
    if a.captions:
        cap_train, cap_val = caption_sets(out / "data" / "captions", a.captions)
        if a.quick:
            cap_val = cap_val[:8]
        cap_base_file = out / "captions-base.json"
        if not cap_base_file.is_file():
            log("captions: text-only base")
            cap_base_file.write_text(json.dumps(caption_scores_of(None, cap_val)[0]))
        cap_base = json.loads(cap_base_file.read_text())
        for name in a.configs.split(","):
            for seed in a.seed_list:
                f = out / f"cap-{name}-s{seed}.json"
                if not f.is_file():
                    log(f"captions: {name} seed {seed}")
                    f.write_text(json.dumps(caption_one(name, seed, cap_train, cap_val, a, out)))
                caps.append(json.loads(f.read_text()))
                r = caps[-1]
                log(f"captions: {name} seed {seed}: CIDEr-D {r['cider']:.3f} (grey {r['grey_cider']:.3f})")
    print(write_table(recs, base, caps, cap_base, a, Path(a.results)))


if __name__ == "__main__":
    main()
