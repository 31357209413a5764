"""Decoding speed: our `generate` vs transformers' `LlamaForCausalLM.generate` on the same weights,
and both against the machine's memory-bandwidth bound.

Batch-1 decoding of a small model is memory-bound: every new token reads every weight once, so
tokens/s can at best be (copy bandwidth) / (weight bytes per token). The HF model is built in
memory from our loaded weights (no second download, no conversion on disk).

    python benchmarks/generate.py                  # SmolLM2-135M-Instruct: fp32 and fp16, base and adapter
    python benchmarks/generate.py --dtypes float32 --batch 1 --no-adapter
    python benchmarks/generate.py --compile       # adds torch.compile rows (ours; ~1-2 min to compile)
    python benchmarks/generate.py --write         # also replace the decoding section of results.md

Rows: the base model (ours vs transformers `generate`) and the model with a K=10, L=30 adaption
prompt (ours vs transformers + PEFT `AdaptionPromptConfig`, holding the same prompt and gate values,
exported with our PEFT converter), in each dtype. The bandwidth bound is per dtype: half-precision
weights are half the bytes. Prints a markdown table on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from llama_adapter.generate import SamplingParams, generate
from llama_adapter.model import LLaMA

PROMPT = "Write a short story about a robot who learns to paint."

# Our parameter names -> transformers' LLaMA names ({i} = layer). Our q/k layout is already HF's
# rotate-half layout, so nothing is permuted.
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hf_model(model: LLaMA):
    """A transformers LlamaForCausalLM sharing nothing but the values of our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_cfg = LlamaConfig(
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        vocab_size=c.vocab_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        rope_scaling={"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None,
        max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_cfg.rope_theta = c.rope_theta  # newer transformers keep it under rope_parameters; set both ways
    hf = LlamaForCausalLM(hf_cfg).to(model.tok_embeddings.weight.dtype).eval()
    sd = {}
    for ours, t in model.state_dict().items():
        parts = ours.split(".")
        key = ".".join(["layers", "{i}", *parts[2:]]) if parts[0] == "layers" else ours
        sd[HF_NAMES[key].replace("{i}", parts[1]) if parts[0] == "layers" else HF_NAMES[key]] = t
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight") and "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF weight mapping is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if c.tie_embeddings:
        hf.tie_weights()
    # No end-of-sequence: both sides generate exactly n tokens, and nothing suppresses a token.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N bytes read+written per second for a large tensor copy."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes_per_token(model: LLaMA) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones once), except an
    untied embedding table, of which a step reads only B rows."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "tok_embeddings.weight" and not model.config.tie_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def time_ours(model: LLaMA, ids: list[int], batch: int, n: int, compile: bool) -> tuple[float, list[int]]:
    """Decode tokens/s (all rows): time from the first new token (end of prefill) to the last."""
    stamps: list[float] = []

    def cb(row: int, tok: int) -> None:
        if row == 0:
            stamps.append(time.perf_counter())

    out = generate(model, [ids] * batch, SamplingParams(max_new_tokens=n), callback=cb, compile=compile)
    return batch * (n - 1) / (stamps[-1] - stamps[0]), out[0]


class _Stamps:
    """A transformers streamer that only records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Batch 1, timed like ours through a streamer."""
    x = torch.tensor([ids])
    s = _Stamps()
    with torch.inference_mode():
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            streamer=s,
        )
    # t[0] is the prompt, t[1] the first new token (after prefill), t[-1] the last.
    return (n - 1) / (s.t[-1] - s.t[1]), out[0, len(ids) :].tolist()


def time_hf_batched(hf, ids: list[int], batch: int, n: int) -> float:
    """Streamers are batch-1 only: time n and 1 new tokens and take the difference (= n-1 decode steps)."""
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


def matmul_floor(model: LLaMA, repeats: int = 5) -> float:
    """Seconds for one batch-1 pass of torch's matmul over every weight a decode step reads: the
    floor of any implementation built on torch's CPU kernels (no attention, norms or overhead)."""
    ws, seen = [], set()
    for name, p in model.named_parameters():
        untied_embedding = name == "tok_embeddings.weight" and not model.config.tie_embeddings
        if p.ndim == 2 and p.data_ptr() not in seen and not untied_embedding:  # a step reads B rows of it
            seen.add(p.data_ptr())
            ws.append(p.detach())
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in ws]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for x, w in zip(xs, ws):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return best


def adapted(model: LLaMA, seed: int = 0):
    """Ours with a K=10, L=30 adaption prompt whose gates are open (one value per layer, so the PEFT
    export is exact), and the same adapter loaded into transformers + PEFT."""
    import tempfile

    from peft import PeftModel

    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, save_adapter
    from llama_adapter.interop import convert_adapter

    torch.manual_seed(seed)
    L = min(30, model.config.n_layers)
    net = AdaptedLLaMA(model, AdapterConfig(adapter_len=10, adapter_layers=L)).eval()
    with torch.no_grad():
        net.adapter.prompts.mul_(0.02)  # an output near the base model's, as after training
        net.adapter.gates.copy_(torch.rand(net.adapter.gates.shape[0], 1).expand_as(net.adapter.gates) * 0.5)
    hf = None
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_adapter(net, f"{d}/ours")
        convert_adapter(f"{d}/ours", f"{d}/peft", to="peft", base=model.config)  # exact to 1e-7
        hf = PeftModel.from_pretrained(hf_model(model), f"{d}/peft").eval()
    return net, hf


def agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint.load_model spec")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default 64)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--dtypes", default="float32,float16", help="comma-separated weight dtypes")
    ap.add_argument("--compile", action="store_true", help="also time our decode step through torch.compile")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--no-adapter", action="store_true", help="skip the adapter (PEFT) rows")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per cell; the best is reported")
    ap.add_argument("--floor-only", action="store_true", help="only time the matmul floor per dtype")
    ap.add_argument("--write", action="store_true", help="replace the decoding section of benchmarks/results.md")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    bw = copy_bandwidth()
    n = args.new_tokens
    batches = [int(b) for b in args.batch.split(",")]
    rows, checks, floors = [], [], []
    ids: list[int] = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        log(f"loading {args.model} ({dtype_name})")
        base = load_model(args.model, dtype=dtype, progress=False).eval()
        if not ids:
            ids = prompt_ids(base, load_tokenizer)
        bound1 = bw / weight_bytes_per_token(base)
        floors.append(f"{dtype_name} {1 / matmul_floor(base):.1f} tok/s")
        if args.floor_only:
            continue
        kinds = ["base"] + ([] if args.no_adapter else ["adapter"])
        for kind in kinds:
            if kind == "base":
                ours_m = base
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hf = None if args.no_hf else hf_model(base)
            else:
                ours_m, hf = adapted(base)
                hf = None if args.no_hf else hf
            label = f"{kind} {dtype_name}"
            for compiled in (False, True) if args.compile else (False,):
                for batch in batches:
                    if compiled and batch != 1:
                        continue
                    log(f"{label}{' compiled' if compiled else ''} batch {batch}: warm-up")
                    # Compiled: warm up on the timed shapes (cache length included), so no (re)compile is timed.
                    for _ in range(2 if compiled else 1):
                        time_ours(ours_m, ids, batch, n if compiled else 4, compiled)
                    ours = max(time_ours(ours_m, ids, batch, n, compiled)[0] for _ in range(args.repeats))
                    theirs = None
                    if hf is not None:
                        if batch == 1:
                            time_hf(hf, ids, 4)
                            theirs = max(time_hf(hf, ids, n)[0] for _ in range(args.repeats))
                        else:
                            time_hf_batched(hf, ids, batch, 4)
                            theirs = max(time_hf_batched(hf, ids, batch, n) for _ in range(args.repeats))
                    log(f"  ours {ours:.2f} tok/s" + (f", transformers {theirs:.2f} tok/s" if theirs else ""))
                    rows.append((label + (" compiled" if compiled else ""), batch, ours, theirs, bound1 * batch))
            if hf is not None:
                a = time_ours(ours_m, ids, 1, 32, False)[1]
                b = time_hf(hf, ids, 32)[1]
                checks.append(f"{label}: greedy outputs agree on {agree(a, b)}/32 tokens")
            del hf

    c = base.config
    out = [
        f"## Decoding speed: {c.name}, {args.threads} threads, {n} new tokens, prompt {len(ids)} tokens\n",
        f"Copy bandwidth {bw / 1e9:.1f} GB/s; the bound is copy bandwidth / weight bytes per step (x batch). "
        "Adapter rows: K=10, L=30, ours vs transformers + PEFT AdaptionPrompt with the same values. "
        "Compiled rows are ours through `torch.compile`, next to transformers in eager mode (best of "
        f"{args.repeats} runs per cell).\n",
        "| model | batch | ours tok/s | HF (+PEFT) tok/s | ours / HF | bound tok/s | ours % of bound |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, batch, ours, theirs, bound in rows:
        t = f"{theirs:.2f}" if theirs else "-"
        r = f"{ours / theirs:.2f}x" if theirs else "-"
        out.append(f"| {label} | {batch} | {ours:.2f} | {t} | {r} | {bound:.1f} | {100 * ours / bound:.0f}% |")
    out.append(
        "\nMatmul floor (torch's `F.linear` over every weight once at batch 1, nothing else; no implementation "
        "on torch's CPU kernels decodes faster): " + ", ".join(floors) + "."
    )
    if checks:
        out.append("\nCorrectness: " + "; ".join(checks) + ".")
    text = "\n".join(out) + "\n"
    print(text)
    if args.write:
        replace_section(Path(__file__).resolve().parent / "results.md", "## Decoding speed", text)
    return 0


def prompt_ids(model: LLaMA, load_tokenizer) -> list[int]:
    tok_path = model.config.extra.get("tokenizer")
    if not tok_path:
        return list(range(1, 13))
    from llama_adapter.tokenizer import render_chat

    tok = load_tokenizer(tok_path)
    text = PROMPT
    if tok.chat_template not in ("alpaca", "plain", None):
        text = render_chat([{"role": "user", "content": PROMPT}], tok.chat_template, add_generation_prompt=True)
    return tok.encode(text, bos=tok.add_bos)


def replace_section(path: Path, heading: str, text: str) -> None:
    """Swap the `heading` section of a markdown file (up to the next `## `) for `text`; append if absent."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    head, sep, rest = old.partition(heading)
    tail = rest[rest.find("\n## ") + 1 :] if sep and "\n## " in rest else ""
    path.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""))
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
