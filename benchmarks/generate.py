"""Decoding speed: our `generate` vs transformers' `LlamaForCausalLM.generate` on the same weights,
and both against the machine's memory-bandwidth bound.

Batch-1 decoding of a small model is memory-bound: every new token reads every weight once, so
tokens/s can at best be (copy bandwidth) / (weight bytes per token). The HF model is built in
memory from our loaded weights (no second download, no conversion on disk).

    python benchmarks/generate.py                      # SmolLM2-135M-Instruct, fp32, 2 threads
    python benchmarks/generate.py --threads 1 --new-tokens 32 --batch 1
    python benchmarks/generate.py --compile --no-hf

Prints a markdown table on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint.load_model spec")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default 64)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the best is reported")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from llama_adapter.checkpoint import load_model
    from llama_adapter.tokenizer import load_tokenizer

    log(f"loading {args.model} (fp32)")
    model = load_model(args.model, dtype=torch.float32).eval()
    tok_path = model.config.extra.get("tokenizer")
    tok = load_tokenizer(tok_path) if tok_path else None
    ids = list(range(1, 13))
    if tok is not None:
        from llama_adapter.tokenizer import render_chat

        text = PROMPT
        if tok.chat_template not in ("alpaca", "plain", None):
            text = render_chat([{"role": "user", "content": PROMPT}], tok.chat_template, add_generation_prompt=True)
        ids = tok.encode(text, bos=tok.add_bos)
    hf = None
    if not args.no_hf:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = hf_model(model)

    bw = copy_bandwidth()
    wbytes = weight_bytes_per_token(model)
    bound1 = bw / wbytes
    n = args.new_tokens
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        log(f"batch {batch}: warm-up")
        time_ours(model, ids, batch, 4, args.compile)
        ours = max(time_ours(model, ids, batch, n, args.compile)[0] for _ in range(args.repeats))
        theirs = None
        if hf is not None:
            if batch == 1:
                time_hf(hf, ids, 4)
                theirs = max(time_hf(hf, ids, n)[0] for _ in range(args.repeats))
            else:
                time_hf_batched(hf, ids, batch, 4)
                theirs = max(time_hf_batched(hf, ids, batch, n) for _ in range(args.repeats))
        bound = bound1 * batch  # one weight read serves every row of the step
        log(f"batch {batch}: ours {ours:.2f} tok/s" + (f", transformers {theirs:.2f} tok/s" if theirs else ""))
        rows.append((batch, ours, theirs, bound))

    check = ""
    if hf is not None:
        a = time_ours(model, ids, 1, 32, False)[1]
        b = time_hf(hf, ids, 32)[1]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        check = f"greedy outputs agree on {same}/32 tokens"

    c = model.config
    print(
        f"## Decoding speed: {c.name}, fp32, {args.threads} threads, {n} new tokens, prompt {len(ids)} tokens"
        f"{', compiled' if args.compile else ''}\n"
    )
    print(
        f"copy bandwidth {bw / 1e9:.1f} GB/s; weights read per step {wbytes / 1e6:.0f} MB "
        f"-> bound {bound1:.1f} steps/s{'; ' + check if check else ''}\n"
    )
    print("| batch | ours tok/s | transformers tok/s | ours / transformers | bandwidth bound tok/s | ours % of bound |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, ours, theirs, bound in rows:
        t = f"{theirs:.2f}" if theirs else "-"
        r = f"{ours / theirs:.2f}x" if theirs else "-"
        print(f"| {batch} | {ours:.2f} | {t} | {r} | {bound:.1f} | {100 * ours / bound:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
