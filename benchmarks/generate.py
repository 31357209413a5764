"""Decoding and prefill speed per weight format: ours vs llama.cpp (same GGUF file) vs transformers.

    python benchmarks/generate.py                       # SmolLM2-135M-Instruct Q4_1: every row, 2 threads
    python benchmarks/generate.py --formats keep --batch 1 --no-hf --no-llamacpp   # one quick row
    python benchmarks/generate.py --write               # also replace the section in benchmarks/results.md

Rows: for each of our weight formats (`--weights`: keep = the GGUF's own Q4_1/Q8_0 tensors, packed;
q8_0; fp32 = dequantized), the base model and the same model with a K=10, L=30 adapter (open gates),
at batch 1 and 8: decode tokens/s (all rows, from the first new token to the last, greedy, the same
prompt in every row) and prefill tokens/s of a 512-token prompt. Next to them: llama.cpp through
llama-cpp-python on the same GGUF with the same threads (batch 1; an optional benchmark-only
dependency: `pip install llama-cpp-python`, a ~15-40 minute build from source here; the column is
skipped with a note when it is missing) and transformers' LlamaForCausalLM in fp32 and fp16 built
from our weights. Run it alone on an idle machine: on 2 cores a concurrent job halves every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.checkpoint import load_model, resolve
from llama_adapter.engine import Engine, Row
from llama_adapter.model import LLaMA
from llama_adapter.sampling import SamplingParams
from llama_adapter.tokenizer import load_tokenizer, render_chat

PROMPT = "Write a short story about a robot who learns to paint."
HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- ours
def with_adapter(base: LLaMA, seed: int = 0) -> AdaptedLLaMA:
    """K=10, L=30 adaption prompts with open gates (an adapter after training costs what this costs)."""
    torch.manual_seed(seed)
    net = AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=min(30, base.config.n_layers))).eval()
    with torch.no_grad():
        net.adapter.prompts.mul_(0.02)
        net.adapter.gates.uniform_(0.0, 0.5)
    return net


def ours_decode(
    model: torch.nn.Module, ids: list[int], batch: int, n: int, compile: bool = False
) -> tuple[float, list[int]]:
    """Decode tokens/s over all rows: from the first new token (end of prefill) to the last."""
    stamps: list[float] = []
    rows = [Row(ids, SamplingParams(max_new_tokens=n)) for _ in range(batch)]
    rows[0].on_token = lambda row, tok: stamps.append(time.perf_counter())
    engine = Engine(model, max_batch=batch, max_len=len(ids) + n, compile=compile)
    engine.run(rows)
    return batch * (n - 1) / (stamps[-1] - stamps[0]), rows[0].tokens


def ours_prefill(model: torch.nn.Module, ids: list[int]) -> float:
    engine = Engine(model, max_batch=1, max_len=len(ids) + 1)
    t = time.perf_counter()
    engine.add([Row(ids, SamplingParams(max_new_tokens=1))])
    return len(ids) / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------- llama.cpp
def llamacpp(path: Path, threads: int, ids: list[int], long_ids: list[int], n: int, repeats: int) -> dict:
    """Batch-1 decode and prefill tokens/s of llama.cpp on the GGUF itself (its own Q4_1 kernels)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                          verbose=False)  # fmt: skip
    best_dec, tokens = 0.0, []
    for _ in range(repeats + 1):  # the first run warms up
        llm.reset()
        stamps, toks = [], []
        for out in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            toks.append(out)
            if len(toks) == n:
                break
        best_dec = max(best_dec, (n - 1) / (stamps[-1] - stamps[0]))
        tokens = toks
    best_pre = 0.0
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        best_pre = max(best_pre, len(long_ids) / (time.perf_counter() - t))
    return {"decode": best_dec, "prefill": best_pre, "tokens": tokens}


# ---------------------------------------------------------------------------------- transformers
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def hf_model(model: LLaMA, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding the values of our (fp32) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                      vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                      max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings)  # fmt: skip
    cfg.rope_theta = c.rope_theta
    hf = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, t in model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, _, leaf = rest.rpartition(".")
            sd[f"model.layers.{i}.{HF_NAMES[mod]}.{leaf}"] = t
        else:
            sd[HF_NAMES[k]] = t
    hf.load_state_dict(sd, strict=False)
    if c.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.to(dtype)


def hf_decode(hf, ids: list[int], batch: int, n: int) -> float:
    """n and 1 new tokens timed apart: the difference is n-1 decode steps (streamers are batch-1 only)."""
    x = torch.tensor([ids] * batch)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=n, **kw)
        tn = time.perf_counter() - t
    return batch * (n - 1) / max(tn - t1, 1e-9)


def hf_prefill(hf, ids: list[int]) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        hf(torch.tensor([ids]))
        return len(ids) / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------- main
def hf_rows(base: LLaMA, args, ids, long_ids, batches, n, rows) -> None:  # noqa: ANN001
    for dtype in (torch.float32, torch.float16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = hf_model(base, dtype)
        label = f"transformers {str(dtype).removeprefix('torch.')}"
        pre = best(lambda h=hf: hf_prefill(h, long_ids), args.repeats)
        for b in batches:
            dec = best(lambda h=hf, b=b: hf_decode(h, ids, b, n), args.repeats)
            rows.append((label, b, dec, pre if b == 1 else None))
            log(f"  {label} batch {b}: decode {dec:.1f} tok/s, prefill {pre:.0f} tok/s")


def best(fn, repeats: int, warmups: int = 1) -> float:
    for _ in range(warmups):  # torch.compile settles its dynamic shapes over the first two runs
        fn()
    return max(fn() for _ in range(repeats))


def prompts(tokenizer_path: str) -> tuple[list[int], list[int]]:
    tok = load_tokenizer(tokenizer_path)
    text = render_chat([{"role": "user", "content": PROMPT}], "chatml") if tok.chat_template == "chatml" else PROMPT
    ids = tok.encode(text, bos=tok.add_bos)
    alpaca = (HERE.parents[1] / "shared" / "data" / "alpaca" / "alpaca_en_demo.json").read_text()
    long_ids = tok.encode(alpaca)[:512]
    return ids, long_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF (preset name or path)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--formats", default="keep,q8_0,fp32", help="our --weights values to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell after a warm-up; best reported")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-adapter", action="store_true")
    ap.add_argument("--compile", default="", help="also time these formats with `--compile` (e.g. keep)")
    ap.add_argument("--write", action="store_true", help="replace the section in benchmarks/results.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, batches = args.new_tokens, [int(b) for b in args.batch.split(",")]
    source = resolve(args.model)
    path = source.path
    ids, long_ids = prompts(str(source.tokenizer))
    rows: list[tuple[str, int, float, float | None]] = []  # label, batch, decode tok/s, prefill tok/s
    notes = []
    ref_tokens: dict[str, list[int]] = {}
    for fmt in args.formats.split(","):
        log(f"loading {args.model} with --weights {fmt}")
        base = load_model(args.model, weights=None if fmt == "fp32" else fmt, progress=False)
        if fmt == "fp32" and not args.no_hf:
            hf_rows(base, args, ids, long_ids, batches, n, rows)  # transformers from the same (unfused) weights
        base.fuse_projections()  # as `load_stack` does for generation
        held = base.config.extra["weights"]
        for kind in ("base",) + (() if args.no_adapter else ("adapter",)):
            model = base if kind == "base" else with_adapter(base)
            label = f"ours {kind}, {held}"
            pre = best(lambda m=model: ours_prefill(m, long_ids), args.repeats)
            for b in batches:
                dec = best(lambda m=model, b=b: ours_decode(m, ids, b, n)[0], args.repeats)
                rows.append((label, b, dec, pre if b == 1 else None))
                log(f"  {label} batch {b}: decode {dec:.1f} tok/s, prefill {pre:.0f} tok/s")
            for b in batches if fmt in args.compile.split(",") else []:
                dec = best(lambda m=model, b=b: ours_decode(m, ids, b, n, True)[0], args.repeats, warmups=2)
                rows.append((label + ", --compile", b, dec, None))
                log(f"  {label} --compile batch {b}: decode {dec:.1f} tok/s")
            ref_tokens[f"{kind} {held}"] = ours_decode(model, ids, 1, n)[1]
            if kind == "adapter":
                model.detach_base()
        del base
    cpp = None
    if not args.no_llamacpp:
        if importlib.util.find_spec("llama_cpp") is None:
            notes.append("llama.cpp column skipped: `pip install llama-cpp-python` (benchmark-only) to add it")
        else:
            log("llama.cpp")
            cpp = llamacpp(path, args.threads, ids, long_ids, n, args.repeats)
            rows.append(("llama.cpp (llama-cpp-python), GGUF as stored", 1, cpp["decode"], cpp["prefill"]))
            notes.append("llama.cpp: batch 1 only (llama-cpp-python's generate decodes one sequence)")
    text = table(args, rows, notes, cpp, ref_tokens, ids, n)
    print(text)
    if args.write:
        replace_section(HERE / "results.md", "## Decoding speed", text)
    return 0


def table(args, rows, notes, cpp, ref_tokens, ids, n) -> str:  # noqa: ANN001
    cmd = "python benchmarks/generate.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    lc = cpp["decode"] if cpp else None
    out = [
        f"## Decoding speed: {args.model}, {args.threads} threads, prompt {len(ids)} tokens, {n} new tokens\n",
        f"`{cmd.strip()}` (load average at the end {load:.2f}; best of {args.repeats} runs per cell after a "
        "warm-up; prefill = a 512-token prompt, batch 1)\n",
        "| engine, weights | batch | decode tok/s | vs llama.cpp | prefill tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, b, dec, pre in rows:
        vs = f"{dec / lc:.2f}x" if lc else "-"
        out.append(f"| {label} | {b} | {dec:.1f} | {vs} | {'-' if pre is None else f'{pre:.0f}'} |")
    if cpp and ref_tokens:
        agree = {k: _agree(v, cpp["tokens"]) for k, v in ref_tokens.items()}
        out.append("\nGreedy tokens equal to llama.cpp's (of the first " + str(n) + "): "
                   + ", ".join(f"{k} {v}" for k, v in agree.items()) + ".")  # fmt: skip
    out += [f"\n{x}." for x in notes]
    return "\n".join(out) + "\n"


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def replace_section(path: Path, heading: str, text: str) -> None:
    """Swap the `heading` section of a markdown file (up to the next `## `) for `text`; append if absent."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    head, sep, rest = old.partition(heading)
    tail = rest[rest.find("\n## ") + 1 :] if sep and "\n## " in rest else ""
    path.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""))
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
