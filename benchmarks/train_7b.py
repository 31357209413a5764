"""One adapter training step on a LLaMA-7B-shaped model with a packed frozen base, on this 24 GB machine.

    python benchmarks/train_7b.py                    # q4_1 base, K=10, L=30, 1 x 128 tokens
    python benchmarks/train_7b.py --weights q8_0 --tokens 256

In fp32 the frozen weights alone are 27 GB: they cannot be held here. The model is built on the meta
device and each linear is then filled with random N(0, 0.02) weights and packed one tensor at a time
(quant.quantize), so no full fp32 copy ever exists; embeddings and norms stay fp32. A K=10, L=30
adapter then takes optimizer steps on random tokens: the frozen linears pass the input gradient
(grad_y @ W, W dequantized a chunk at a time) and never a weight gradient. Prints the peak RSS of
this process (ru_maxrss), the packed bytes and the step times.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from torch import nn

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, count_trainable, param_groups
from llama_adapter.config import Config
from llama_adapter.model import LLaMA, rope_frequencies
from llama_adapter.quant import QuantLinear, quantize


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def packed_llama(config: Config, fmt: str, seed: int = 0) -> LLaMA:
    """A LLaMA whose linears are random and packed in `fmt`, built without a full-precision copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = LLaMA(config)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            w = torch.empty(mod.out_features, mod.in_features).normal_(0, 0.02, generator=g)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(quantize(w, fmt), fmt))
            del w
    model.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
    nn.init.normal_(model.tok_embeddings.weight, 0, 0.02, generator=g)
    for mod in model.modules():
        if hasattr(mod, "eps"):  # RMSNorm
            mod.weight = nn.Parameter(torch.ones(config.dim))
    model.inv_freq = rope_frequencies(config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-7b")
    ap.add_argument("--weights", default="q4_1", choices=["q4_0", "q4_1", "q8_0"])
    ap.add_argument("--tokens", type=int, default=128, help="tokens in the step (one row)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = Config.from_name(args.preset)
    t0 = time.perf_counter()
    base = packed_llama(config, args.weights)
    packed = sum(b.numel() for b in base.buffers() if b.dtype == torch.uint8)
    log(f"built {args.preset} with {args.weights} linears in {time.perf_counter() - t0:.0f} s, peak {peak_gb():.1f} GB")
    torch.manual_seed(0)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=30)).train()
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-3)
    idx = torch.randint(0, config.vocab_size, (1, args.tokens))
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        h = model(idx, hidden_only=True)
        loss = nn.functional.cross_entropy(model.model.output(h[0, :-1]), idx[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        log(f"step: loss {loss.item():.3f}, {times[-1]:.1f} s, peak {peak_gb():.1f} GB")
    cmd = "python benchmarks/train_7b.py " + " ".join(sys.argv[1:])
    print(f"## Training on a {args.preset}-shaped packed base\n")
    print(f"`{cmd.strip()}`: {args.threads} threads, 1 x {args.tokens} tokens per step, K=10, L=30\n")
    print("| frozen base | packed bytes | trainable | step time (s) | peak RSS (GB) | fp32 weights alone |")
    print("|---|---:|---:|---:|---:|---:|")
    fp32 = sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, QuantLinear)) * 4 / 2**30
    print(f"| {args.weights} | {packed / 2**30:.2f} GiB | {count_trainable(model):,} | {min(times):.1f} | "
          f"{peak_gb():.1f} | {fp32:.1f} GiB |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
