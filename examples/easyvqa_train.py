"""easy-VQA accuracy with SmolLM2-135M-Instruct + EfficientNet-Lite0 (CPU-sized run, one thread).
(Named easyvqa_train.py, not easy_vqa.py: a script beside the others must not shadow the easy_vqa package.)

    python examples/easyvqa_train.py --out runs/easy_vqa

1. Converts the `easy-vqa==1.0` pip package with `multimodal.easyvqa_to_jsonl`.
2. Trains a multimodal adapter on a random subset of the train questions (default 640, 1 epoch,
   top 10 of 30 layers adapted), written in the same multiple-choice prompt that
   `llama-adapter evaluate --task mc` scores (the paper's ScienceQA format, `evaluate.mc_body`,
   template `plain`), the answer as text:

       Question: What is the color of the triangle?
       Context: N/A
       Options: (A) green (B) red (C) gray (D) teal (E) black (F) yellow (G) brown (H) blue
       Answer: The answer is red

3. Scores the first `--n-test` test questions (default 200) by log-likelihood of each candidate
   answer (the answers of the question's kind: yes/no, 3 shapes or 8 colours) for: the adapter
   with the image, the adapter with a blank grey image, and the base model text only. The first
   and third rows are exactly `llama-adapter evaluate --task mc --format easyvqa --target text`.

Writes examples/results/easy_vqa.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from llama_adapter.evaluate import EvalArgs, MCItem, easyvqa_kind, load_easyvqa, mc_body, run
from llama_adapter.loading import load_stack
from llama_adapter.multimodal import VQA_SUFFIX, easyvqa_to_jsonl, load_image_examples
from llama_adapter.train import TrainArgs, finetune


def mc_row(ex: dict, vocab: list[str]) -> dict:
    """A converter row {"image", "instruction", "output"} -> the evaluator's prompt and answer."""
    question = ex["instruction"].removesuffix(VQA_SUFFIX)
    kind = easyvqa_kind(ex["output"])
    choices = [v for v in vocab if easyvqa_kind(v) == kind]  # as evaluate.load_easyvqa(candidates="kind")
    item = MCItem("", question, choices, choices.index(ex["output"]))
    # Template "plain" renders the instruction + "\n", so prompt + output is exactly
    # evaluate.mc_prompt(item, "plain") + " " + answer, the string that is scored.
    return {
        "image": ex["image"],
        "instruction": mc_body(item).rstrip("\n"),
        "output": f"Answer: The answer is {ex['output']}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/easy_vqa")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-train", type=int, default=640, help="train questions (random subset)")
    ap.add_argument("--n-val", type=int, default=32, help="held-out train questions for the loss curve")
    ap.add_argument("--n-test", type=int, default=200, help="first N test questions")
    ap.add_argument("--adapter-layers", type=int, default=10, help="top layers adapted (fewer: less backward work)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="examples/results/easy_vqa.md")
    a = ap.parse_args()
    # Run as a script, this file's folder comes first on sys.path, and this file is named like the
    # `easy_vqa` package the converter imports: drop the folder so `import easy_vqa` finds the package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    torch.set_num_threads(a.threads)  # the machine is shared; one thread each
    out = Path(a.out).resolve()
    t0 = time.time()
    train_jsonl, _ = easyvqa_to_jsonl(out / "data")  # needs `pip install easy-vqa==1.0`
    import easy_vqa

    vocab = list(easy_vqa.get_answers())
    rows = load_image_examples(train_jsonl, check_images=False)
    rng = random.Random(0)
    pick = rng.sample(range(len(rows)), a.n_train + a.n_val)
    train = [mc_row(rows[i], vocab) for i in pick[: a.n_train]]
    val = [mc_row(rows[i], vocab) for i in pick[a.n_train :]]
    for name, part in (("train_mc.jsonl", train), ("val_mc.jsonl", val)):
        (out / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    run_dir = out / "adapter"
    if run_dir.exists():  # a re-run trains afresh (the image features stay cached under --out)
        print(f"replacing the previous run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    steps = -(-a.n_train // a.batch_size)
    targs = TrainArgs(
        model=a.model,
        data=str(out / "data" / "train_mc.jsonl"),
        val_data=str(out / "data" / "val_mc.jsonl"),
        out=str(run_dir),
        template="plain",
        epochs=1,
        batch_size=a.batch_size,
        max_len=96,
        lr=a.lr,
        warmup_steps=max(1, steps // 10),
        adapter_layers=a.adapter_layers,
        max_val_examples=a.n_val,
        eval_every=steps,
        save_every=100_000,
        image_encoder="efficientnet-lite0",
        feature_cache=str(out / "features"),
    )
    res = finetune(targs)
    t_train = time.time() - t0
    print(f"trained {res.steps} steps in {t_train / 60:.1f} min; val loss {res.val_losses}", flush=True)

    ev = EvalArgs(
        model=a.model,
        task="mc",
        format="easyvqa",
        limit=a.n_test,
        target="text",
        template="plain",
        batch_size=16,
        progress=False,
    )
    stack = load_stack(a.model, str(run_dir), template="plain")
    grey = out / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    reports = {}
    t = time.time()
    reports["adapter + image"] = run(replace(ev, adapter=str(run_dir)), stack)
    print(f"adapter + image: {reports['adapter + image']['accuracy']:.4f} ({time.time() - t:.0f}s)", flush=True)
    # Blank image: the same questions, every image replaced by one grey picture (run() reads the
    # items itself, so this condition goes through eval_mc via a jsonl of the same items).
    items = load_easyvqa("test", limit=a.n_test).items
    grey_jsonl = out / "data" / "test_grey_mc.jsonl"
    grey_jsonl.write_text(
        "".join(
            json.dumps(
                {
                    "id": it.id,
                    "question": it.question,
                    "choices": it.choices,
                    "answer": it.answer,
                    "image": str(grey),
                    "category": it.meta["kind"],
                }
            )
            + "\n"
            for it in items
        )
    )
    t = time.time()
    reports["adapter + blank (grey) image"] = run(
        replace(ev, adapter=str(run_dir), format="jsonl", data=str(grey_jsonl)), stack
    )
    print(f"grey: {reports['adapter + blank (grey) image']['accuracy']:.4f} ({time.time() - t:.0f}s)", flush=True)
    del stack
    base = load_stack(a.model, template="plain")
    t = time.time()
    reports["base model, text only (no adapter)"] = run(ev, base)
    print(f"base: {reports['base model, text only (no adapter)']['accuracy']:.4f} ({time.time() - t:.0f}s)", flush=True)
    total = time.time() - t0

    def kind_acc(r: dict, k: str) -> str:
        g = (r["groups"].get("kind") or r["groups"].get("category") or {}).get(k)  # jsonl groups: category
        return f"{g['accuracy']:.3f}" if g else "-"

    kinds = ["yes/no", "shape", "color"]
    n_kind = {k: sum(it.meta["kind"] == k for it in items) for k in kinds}
    chance = reports["adapter + image"]["chance"]
    first = res.val_losses[0][1] if res.val_losses else float("nan")
    last = res.val_losses[-1][1] if res.val_losses else float("nan")
    lines = [
        "# easy-VQA: SmolLM2-135M-Instruct + EfficientNet-Lite0 adapter (CPU run)",
        "",
        f"Train: {a.n_train} random easy-VQA train questions (seed 0), 1 epoch, batch {a.batch_size}, "
        f"lr {a.lr}, adapter_len 10, adapter_layers {a.adapter_layers}, {res.steps} steps. "
        f"Held-out loss ({a.n_val} other train questions) {first:.3f} -> {last:.3f}.",
        f"Test: the first {a.n_test} easy-VQA test questions ({', '.join(f'{n_kind[k]} {k}' for k in kinds)}), "
        "log-likelihood of each candidate answer of the question's kind (2 / 3 / 8 candidates), "
        "prompt = the paper's ScienceQA format (template `plain`).",
        f"Wall time {total / 60:.1f} min in all ({t_train / 60:.1f} min conversion + feature extraction + training), "
        f"{a.threads} thread(s) on a shared 2-core CPU.",
        "",
        "| condition | accuracy | yes/no | shape | color |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {r['accuracy']:.3f} | " + " | ".join(kind_acc(r, k) for k in kinds) + " |"
            for n, r in reports.items()
        ],
        f"| chance (uniform over the candidates) | {chance:.3f} | 0.500 | 0.333 | 0.125 |",
        "",
        "Commands (the `evaluate` lines reproduce the first and third rows):",
        "",
        "```",
        "nice -n 5 python examples/easyvqa_train.py " + " ".join(sys.argv[1:]),
        f"llama-adapter evaluate --model {a.model} --adapter {a.out}/adapter --task mc --format easyvqa "
        f"--limit {a.n_test} --target text",
        f"llama-adapter evaluate --model {a.model} --task mc --format easyvqa --limit {a.n_test} --target text "
        "--template plain",
        "```",
        "",
    ]
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text("\n".join(lines))
    (out / "reports.json").write_text(
        json.dumps(
            {k: {kk: vv for kk, vv in r.items() if kk != "predictions"} for k, r in reports.items()},
            indent=2,
            default=str,
        )
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
