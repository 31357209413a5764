"""Matmul kernels for frozen weights: y = x @ W^T at decode (M=1), batched decode (M=8, 64) and prefill (M=512),
for SmolLM2-135M and LLaMA-7B shapes, fp32/fp16 torch, fbgemm dynamic int8 and our packed q4_0/q4_1/q8_0.

    python benchmarks/kernels.py                      # SmolLM2 + 7B shapes, M in {1, 8, 64, 512}, 2 threads
    python benchmarks/kernels.py --quick              # SmolLM2 shapes only, fewer repeats
    python benchmarks/kernels.py --kernels            # also each of our kernels, whatever M
    python benchmarks/kernels.py --grad               # input gradient grad_y @ W: the options for training
    python benchmarks/kernels.py --clock thread       # 1 thread, CPU time: comparable on a busy machine

Each cell is the best of several rounds in which every method runs in turn (interleaved, so a busy machine
slows all of them alike). GB/s counts the weight bytes read once per call; GOP/s is 2*M*N*K per second.
"ours qX" is what QuantLinear runs for that M with its default 8-bit activations (see linear.py); with
--kernels the rows "qX rows" / "qX packed" (8-bit activations), "qX fp32" / "qX mm" (exact fp32 activations)
show every kernel. The decode-step table times all 211 matmuls of one SmolLM2 token (210 layer matrices and
the 49152x576 output projection), unfused and with q/k/v and gate/up fused. Prints markdown on stdout,
progress on stderr, with the command and the load average (numbers from a busy machine are not comparable).
Rows "x8" use QuantLinear(layout="x8"), the same bytes with 8 rows interleaved per block.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama_adapter.quant import (
    FORMATS,
    KERNELS,
    MM_MIN_ROWS,
    PACKED_MIN_ROWS,
    convert_layout,
    kernels_available,
    quant_linear,
    quantize,
    unavailable_reason,
)
from llama_adapter.quant.formats import BLOCK_BYTES

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]
# One SmolLM2 decode step: per layer wq, wk, wv, wo, w1, w3, w2 (30 layers), then the output projection.
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_LAYER_FUSED = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, wo, w1|w3, w2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


CLOCK = time.perf_counter  # --clock thread: CPU time of this thread (1 thread), blind to other processes


def bench(fns: dict[str, Callable[[], object]], budget_s: float, rounds: int) -> dict[str, float]:
    """Seconds per call of each fn: the best round, rounds interleaved across fns."""
    for fn in fns.values():  # warm-up: first-call allocations, lazy init
        fn()
    per_call = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-6)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            n = max(1, int(budget_s / rounds / per_call[name]))
            t = CLOCK()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (CLOCK() - t) / n)
    return best


def fbgemm_linear(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's dynamic int8 linear (fbgemm, per-channel weight scales, activations quantized per call)."""
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        return quantize_dynamic(torch.nn.Sequential(lin), {"": per_channel_dynamic_qconfig}, inplace=False)[0]


def methods(w: torch.Tensor, m: int, all_kernels: bool) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """name -> fn, and name -> weight bytes, for one [N, K] weight at M rows."""
    n, k = w.shape
    x = torch.randn(m, k)
    w16, xh = w.half(), x.half()
    fb = fbgemm_linear(w)
    fns: dict[str, Callable[[], object]] = {
        "fp32": lambda: F.linear(x, w),
        "fp16": lambda: F.linear(xh, w16),
        "fbgemm int8": lambda: fb(x),
    }
    nbytes = {"fp32": 4 * n * k, "fp16": 2 * n * k, "fbgemm int8": n * k + 4 * n}
    for fmt in FORMATS:
        p = quantize(w, fmt)
        fns[f"ours {fmt}"] = lambda p=p, fmt=fmt: quant_linear(x, p, fmt)
        nbytes[f"ours {fmt}"] = p.numel()
        if n % 8 == 0:
            p8 = convert_layout(p, fmt, "gguf", "x8")
            fns[f"ours {fmt} x8"] = lambda p8=p8, fmt=fmt: quant_linear(x, p8, fmt, layout="x8")
            nbytes[f"ours {fmt} x8"] = p8.numel()
        if all_kernels:
            for kernel in KERNELS:
                fns[f"{fmt} {kernel}"] = lambda p=p, fmt=fmt, kernel=kernel: quant_linear(x, p, fmt, kernel=kernel)
                nbytes[f"{fmt} {kernel}"] = p.numel()
    return fns, nbytes


def shape_table(shapes: list[tuple[int, int]], ms: list[int], args: argparse.Namespace) -> None:
    print("| N x K | M | method | us/call | GB/s | GOP/s | vs fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        for m in ms:
            log(f"  {n}x{k} M={m}")
            fns, nbytes = methods(w, m, args.kernels)
            t = bench(fns, args.budget, args.rounds)
            for name, s in t.items():
                gbs, gops = nbytes[name] / s / 1e9, 2 * m * n * k / s / 1e9
                print(f"| {n}x{k} | {m} | {name} | {s * 1e6:.1f} | {gbs:.1f} | {gops:.1f} | {t['fp32'] / s:.2f}x |")
            sys.stdout.flush()


def decode_step(batch: int) -> Callable[[list, tuple], None]:
    """One token's matmuls for `batch` rows: (weights, output projection), each (tensor, format or None)."""
    x = {576: torch.randn(batch, 576), 1536: torch.randn(batch, 1536)}
    xh = {k: v.half() for k, v in x.items()}

    def step(mats: list, last: tuple) -> None:
        for p, fmt in [*mats, last]:
            if fmt is None:
                F.linear(xh[p.shape[1]] if p.dtype == torch.float16 else x[p.shape[1]], p)
            else:
                f, _, layout = fmt.partition(" ")
                quant_linear(x[p.shape[1] // BLOCK_BYTES[f] * 32], p, f, layout=layout or "gguf")

    return step


def decode_step_table(args: argparse.Namespace) -> None:
    """All matmuls of one SmolLM2 token: tokens/s per weight format, batch 1 and 8, unfused and fused."""
    print("\n| weights | layout | batch | ms/step | tokens/s | MB read/step |")
    print("|---|---|---:|---:|---:|---:|")
    out = torch.randn(49152, 576) * 0.02
    for layout, layer in (("unfused", SMOLLM2_LAYER), ("fused qkv, gate/up", SMOLLM2_LAYER_FUSED)):
        ws = [torch.randn(n, k) * 0.02 for _ in range(30) for n, k in layer]
        variants: dict[str, tuple[list, object]] = {"fp32": ([(w, None) for w in ws], (out, None))}
        variants["fp16"] = ([(w.half(), None) for w in ws], (out.half(), None))
        for fmt in FORMATS:
            variants[fmt] = ([(quantize(w, fmt), fmt) for w in ws], (quantize(out, fmt), fmt))
        # the GGUF file's own mix: Q4_1 layers, Q8_0 tied embedding / output
        variants["q4_1 + q8_0 output"] = (variants["q4_1"][0], (quantize(out, "q8_0"), "q8_0"))
        for name in ("q4_0", "q4_1 + q8_0 output"):
            mats, (p, fmt) = variants[name]
            x8 = [(convert_layout(m, f, "gguf", "x8"), f + " x8") for m, f in mats]
            variants[name + ", x8 layout"] = (x8, (convert_layout(p, fmt, "gguf", "x8"), fmt + " x8"))
        for batch in (1, 8):
            step = decode_step(batch)
            log(f"  decode step {layout} batch {batch}")
            fns = {name: (lambda v=v, step=step: step(*v)) for name, v in variants.items()}
            t = bench(fns, args.budget * 4, args.rounds)
            for name, s in t.items():
                mats, last = variants[name]
                mb = sum(p.numel() * p.element_size() for p, _ in [*mats, last]) / 1e6
                print(f"| {name} | {layout} | {batch} | {s * 1e3:.2f} | {batch / s:.1f} | {mb:.0f} |")
            sys.stdout.flush()


def grad_methods(w: torch.Tensor, layer, wt, fb_t, m: int) -> dict[str, Callable[[], object]]:  # noqa: ANN001
    n, k = w.shape
    gy = torch.randn(m, n)
    x = torch.randn(m, k, requires_grad=True)
    y = layer(x)
    return {
        "fp32 mm (fp32 weight)": lambda: gy @ w,
        "ours: dequantize chunks + MKL": lambda: torch.autograd.grad(y, x, gy, retain_graph=True),
        "transposed q8_0 copy, packed int8 kernel": lambda: quant_linear(gy, wt.weight, "q8_0"),
        "transposed q8_0 copy, dequantize + MKL": lambda: quant_linear(gy, wt.weight, "q8_0", kernel="mm"),
        "fbgemm, transposed int8 copy": lambda: fb_t(gy),
    }


def grad_table(args: argparse.Namespace) -> None:
    """grad_x = grad_y @ W for a frozen W: per-call dequantize + MKL (what QuantLinear does), a transposed q8_0
    copy run through our kernels, fbgemm on a transposed int8 copy, and fp32 as the reference."""
    from llama_adapter.quant import QuantLinear

    print("\n| N x K | M | input-gradient method | ms/call | extra weight memory |")
    print("|---|---:|---|---:|---|")
    for n, k in [(1536, 576), (576, 1536), (11008, 4096)]:
        w = torch.randn(n, k) * 0.02
        layer = QuantLinear.from_float(w, "q4_1")
        wt = QuantLinear.from_float(layer.dequantize().t().contiguous(), "q8_0")  # [K, N]
        fb_t = fbgemm_linear(layer.dequantize().t().contiguous())
        for m in (512, 1024) if not args.quick else (512,):
            fns = grad_methods(w, layer, wt, fb_t, m)
            extra = {
                "fp32 mm (fp32 weight)": f"{4 * n * k / 1e6:.1f} MB (the fp32 weight itself)",
                "ours: dequantize chunks + MKL": f"{min(n, max(256, 128 * 1024 // k)) * k * 4 / 1e6:.2f} MB transient",
                "transposed q8_0 copy, packed int8 kernel": f"+{wt.weight.numel() / 1e6:.1f} MB resident",
                "transposed q8_0 copy, dequantize + MKL": f"+{wt.weight.numel() / 1e6:.1f} MB resident",
                "fbgemm, transposed int8 copy": f"+{n * k / 1e6:.1f} MB resident",
            }
            log(f"  grad {n}x{k} M={m}")
            for name, s in bench(fns, args.budget, args.rounds).items():
                print(f"| {n}x{k} | {m} | {name} | {s * 1e3:.2f} | {extra[name]} |")
            sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--ms", default="1,8,64,512", help="rows of x per call (default 1,8,64,512)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, shorter timing")
    ap.add_argument("--kernels", action="store_true", help="also time each of our kernels at every M")
    ap.add_argument("--grad", action="store_true", help="also time the input-gradient options")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-step table")
    ap.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall: elapsed time (an idle machine); thread: this thread's CPU time with 1 thread, which other "
        "processes on a busy machine barely disturb (they still share caches and memory bandwidth)",
    )
    args = ap.parse_args()
    if args.clock == "thread":
        global CLOCK
        CLOCK, args.threads = time.thread_time, 1
    torch.set_num_threads(args.threads)
    args.budget, args.rounds = (0.15, 3) if args.quick else (0.4, 5)
    if not kernels_available():
        log(f"warning: C++ kernels unavailable ({unavailable_reason()}): 'ours' rows are the torch fallback")
    print(f"`{shlex.join(['python', *sys.argv])}`  ")
    load = os.getloadavg()
    print(f"threads {args.threads}, clock {args.clock}, ", end="")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, ", end="")
    cap = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, cpu {cap}, packed kernel from M={PACKED_MIN_ROWS}, fp32 mm from M={MM_MIN_ROWS}\n"
    )
    ms = [int(m) for m in args.ms.split(",")]
    shape_table(SMOLLM2 if args.quick else SMOLLM2 + LLAMA7B, ms, args)
    if not args.no_decode:
        decode_step_table(args)
    if args.grad:
        grad_table(args)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
