"""What each weight format costs in quality: greedy agreement with the fp32 reference and held-out
perplexity, next to llama.cpp's perplexity on the same GGUF file.

    python benchmarks/quality.py                 # SmolLM2-135M-Instruct Q4_1 GGUF, 8 prompts x 64 tokens, 200 examples
    python benchmarks/quality.py --examples 20 --prompts 2 --write

The reference is the GGUF dequantized to fp32 (`--weights fp32`): the file's own 4-bit values in exact
arithmetic. `keep` runs those same values packed (Q4_1 blocks, Q8_0 embedding) with 8-bit activations, as
llama.cpp does; `q8_0` / `q4_0` re-quantize the fp32 reference, which is what `--weights q8` / `q4`
do to a float checkpoint. Perplexity is over the response tokens of the last `--examples` Alpaca demo
examples in SmolLM2's chat format (the same tokens for every row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama_adapter.checkpoint import load_model, resolve
from llama_adapter.data import encode_example
from llama_adapter.generate import generate
from llama_adapter.quant import quantize_linears
from llama_adapter.sampling import SamplingParams
from llama_adapter.tokenizer import load_tokenizer, render_chat

HERE = Path(__file__).resolve().parent
ALPACA = HERE.parents[1] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
PROMPTS = [
    "Name three primary colours.", "Write a haiku about the sea.", "What is the capital of France?",
    "Give me a tip for staying focused.", "Explain what a noun is.", "Translate 'good morning' into French.",
    "List two benefits of exercise.", "Describe a cat in one sentence.",
]  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def heldout(tok, n: int) -> list[tuple[list[int], list[int]]]:  # noqa: ANN001
    """(token ids, labels with -100 outside the response) of the last n Alpaca demo examples."""
    data = json.loads(ALPACA.read_text())[-n:]
    out = []
    for ex in data:
        enc = encode_example(ex, tok, "chatml", max_len=1024)
        out.append((list(enc.input_ids), list(enc.labels)))
    return out


def nll_ours(model, examples) -> tuple[float, int]:  # noqa: ANN001
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, labels in examples:
            logits = model(torch.tensor([ids]))[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


def nll_llamacpp(path: Path, threads: int, examples) -> tuple[float, int]:  # noqa: ANN001
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_threads=threads, n_ctx=1024, logits_all=True, verbose=False)
    total, count = 0.0, 0
    for ids, labels in examples:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
        target = torch.tensor(labels[1:])
        keep = target != -100
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total, count


def agreement(model, ref_out: list[list[int]], ids: list[list[int]], n: int) -> tuple[float, int]:  # noqa: ANN001
    outs = generate(model, ids, SamplingParams(max_new_tokens=n))
    same = [
        next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r))) for o, r in zip(outs, ref_out)
    ]
    return sum(same) / len(same), sum(s >= min(len(r), n) for s, r in zip(same, ref_out))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--formats", default="keep,q8_0,q4_0")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = resolve(args.model)
    tok = load_tokenizer(source.tokenizer)
    examples = heldout(tok, args.examples)
    ids = [tok.encode(render_chat([{"role": "user", "content": p}], "chatml")) for p in PROMPTS[: args.prompts]]
    n = args.new_tokens
    log("fp32 reference")
    ref = load_model(args.model, progress=False)
    ref_out = generate(ref, ids, SamplingParams(max_new_tokens=n))
    t, c = nll_ours(ref, examples)
    rows = [("ours fp32 (the GGUF dequantized)", math.exp(t / c), None, None)]
    base_ppl = rows[0][1]
    for fmt in args.formats.split(","):
        log(fmt)
        if fmt == "keep":
            model, label = load_model(args.model, weights="keep", progress=False), "ours keep (Q4_1/Q8_0 as stored)"
        else:
            model = load_model(args.model, progress=False)
            quantize_linears(model, fmt)
            label = f"ours {fmt} (the fp32 reference re-quantized)"
        t, c = nll_ours(model, examples)
        mean, exact = agreement(model, ref_out, ids, n)
        rows.append((label, math.exp(t / c), mean, exact))
        del model
    if importlib.util.find_spec("llama_cpp") is not None:
        log("llama.cpp")
        t, c = nll_llamacpp(source.path, args.threads, examples)
        rows.append(("llama.cpp on the same GGUF", math.exp(t / c), None, None))
    cmd = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    out = [
        f"## Quality per weight format: {args.model}\n",
        f"`{cmd.strip()}`: perplexity over the response tokens ({c} tokens) of the last {args.examples} Alpaca "
        f"demo examples; greedy agreement over {n} new tokens on {len(ids)} prompts against the fp32 reference\n",
        "| weights | perplexity | vs fp32 | greedy tokens equal (mean of " + str(n) + ") | prompts identical |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, ppl, mean, exact in rows:
        agree = "-" if mean is None else f"{mean:.1f}"
        ex = "-" if exact is None else f"{exact}/{len(ids)}"
        out.append(f"| {label} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {agree} | {ex} |")
    text = "\n".join(out) + "\n"
    print(text)
    if args.write:
        from generate import replace_section

        replace_section(HERE / "results.md", "## Quality per weight format", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
