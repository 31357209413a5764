"""Training time, memory and quality for one epoch of the Alpaca demo: ours vs PEFT AdaptionPrompt vs
full fine-tuning.

Every row trains ONE epoch over the same training examples of ../shared/data/alpaca/alpaca_en_demo.json
(the trainer's fixed held-out split: 949 train, 50 held out, seed 0), chatml template, max length 512
(so the same response tokens carry loss in every row), about 2,048 tokens per optimizer step, K=10, then
reports the mean response-token loss on the 50 held-out examples. Each row runs in a fresh subprocess
(its peak RSS is its own); the progress bar of each goes to stderr.

rows
  ours          our trainer, packed steps of 2,048 tokens (block-diagonal attention, no padding), fp32
  ours-padded   our trainer with --no-pack: length-grouped padded batches of B examples (B x mean ~ 2,048)
  ours-q8       ours with the frozen base loaded as --weights (q8_0); skipped while load_model lacks weights=
  peft          PEFT AdaptionPrompt on a transformers LlamaForCausalLM holding the same weights, in a plain
                loop over the same length-grouped batches as ours-padded (its best CPU setting: sdpa, no
                attention mask needed with right padding, no KV cache)
  full          full fine-tuning of the same model in our trainer (packed, AdamW over every weight)
  ours-top10, peft-top10   only the top 10 of the 30 layers adapted

    python benchmarks/train.py                      # every row, one epoch each (about 2 h on an idle 2-core CPU)
    python benchmarks/train.py --quick              # smoke test: 32 training examples, 16 held out
    python benchmarks/train.py --limit 200 --rows ours,peft
    python benchmarks/train.py --profile            # torch.profiler: where one packed 2,048-token step goes
    python benchmarks/train.py --floor              # one packed step vs its GEMMs alone and its attention alone
    python benchmarks/train.py --write              # also replace the "## Training" section of results.md

"peak RSS" is the whole process (loading included: the PEFT rows convert our weights into a HF model);
"train peak" is the high-water mark of the epoch alone (reset through /proc/self/clear_refs once the model
and data are ready), the number the memory target compares. Markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The shared data folder sits beside the repository (as in CI); ALPACA_DATA overrides it.
DATA = os.environ.get("ALPACA_DATA", str(HERE.parent.parent / "shared/data/alpaca/alpaca_en_demo.json"))
MODEL = "smollm2-135m-instruct"
RESULTS = HERE / "results.md"
SECTION = "## Training"
K, MAX_LEN, STEP_TOKENS = 10, 512, 2048
LR = {"adapter": 1e-2, "full": 5e-5}  # one common value per method, the same for ours and PEFT
ROWS: dict[str, dict[str, Any]] = {
    "ours": {"impl": "ours", "layers": 30, "pack": True},
    "ours-padded": {"impl": "ours", "layers": 30, "pack": False},
    "ours-q8": {"impl": "ours", "layers": 30, "pack": True, "weights": "q8_0"},
    "peft": {"impl": "peft", "layers": 30},
    "full": {"impl": "full", "layers": 30, "pack": True},
    "ours-top10": {"impl": "ours", "layers": 10, "pack": True},
    "peft-top10": {"impl": "peft", "layers": 10},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    """VmHWM: peak RSS since the last `reset_peak` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------ one row
def load_data(tok: Any, limit: int | None, n_val: int | None) -> tuple[Any, Any]:
    """(train, held-out) encoded as every row sees them: the trainer's split, chatml, max length 512."""
    from llama_adapter.data import InstructionDataset, load_examples, split_holdout

    train, val = split_holdout(load_examples(DATA), 0.05, seed=0)
    if limit:
        train, val = train[:limit], val[:n_val]
    return InstructionDataset(train, tok, "chatml", MAX_LEN), InstructionDataset(val, tok, "chatml", MAX_LEN)


def padded_batch_size(lengths: list[int]) -> int:
    """Examples per padded batch holding about STEP_TOKENS real tokens."""
    return max(1, round(STEP_TOKENS * len(lengths) / sum(lengths)))


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One row: load, encode, train one epoch (timed), evaluate the held-out loss."""
    import torch

    from llama_adapter.data import batch_indices, collate
    from llama_adapter.tokenizer import load_tokenizer
    from llama_adapter.train import TrainArgs, load_base

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    try:
        model = load_base(TrainArgs(model=MODEL, weights=cfg.get("weights")))
    except ValueError as e:
        return {**cfg, "skipped": str(e)}
    tok = load_tokenizer(model.config.extra["tokenizer"])
    train, val = load_data(tok, cfg["limit"], cfg["n_val"])
    lengths = train.lengths
    batch = padded_batch_size(lengths)
    order = batch_indices(lengths, batch, shuffle=True, seed=0, epoch=0, drop_last=True)  # as --no-pack
    val_batches = [collate([val[i] for i in b], tok.pad_id) for b in batch_indices(val.lengths, 8, shuffle=False)]
    fn = train_peft if cfg["impl"] == "peft" else train_ours
    out = fn(cfg, model, tok, train, val_batches, batch, order)
    if cfg["impl"] == "peft" or not cfg["pack"]:
        out["slots"] = sum(batch * max(lengths[i] for i in b) for b in order)
        out["tokens"] = sum(lengths[i] for b in order for i in b)
    else:
        out["slots"] = out["tokens"] = sum(lengths)
    return {**cfg, **out, "n_train": len(train), "n_val": len(val), "truncated": train.n_truncated, "batch": batch}


def train_ours(cfg: dict, model: Any, tok: Any, train: Any, val_batches: list, batch: int, order: list) -> dict:
    import torch

    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
    from llama_adapter.train import TrainArgs, evaluate_loss, fit

    if cfg["impl"] == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        net = model.train()
    else:
        torch.manual_seed(0)
        net = AdaptedLLaMA(model, AdapterConfig(adapter_len=K, adapter_layers=cfg["layers"])).train()
    lr = LR["full" if cfg["impl"] == "full" else "adapter"]
    args = TrainArgs(
        pack=cfg["pack"], batch_tokens=STEP_TOKENS if cfg["pack"] else None, batch_size=batch, epochs=1, lr=lr,
        warmup_epochs=0.1, eval_every=10**9, save_every=10**9, seed=0, max_len=MAX_LEN,
    )  # fmt: skip
    gc.collect()
    setup_mb, reset = rss_mb(), reset_peak()
    t = time.perf_counter()
    res = fit(net, train, [], args, pad_id=tok.pad_id, progress=True)
    secs = time.perf_counter() - t
    train_peak = hwm_mb() if reset else None
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {
        "epoch_s": secs, "steps": res.steps, "val_loss": evaluate_loss(net, val_batches), "lr": lr,
        "train_loss_last": res.train_losses[-1], "trainable": trainable,
        "peak_mb": max(setup_mb, rss_mb()), "train_peak_mb": train_peak,
    }  # fmt: skip


def train_peft(cfg: dict, model: Any, tok: Any, train: Any, val_batches: list, batch: int, order: list) -> dict:
    """PEFT AdaptionPrompt in a plain loop: the same batches, lr schedule, AdamW settings and clipping
    as ours-padded."""
    import warnings

    import torch
    from peft import AdaptionPromptConfig, get_peft_model

    from llama_adapter.data import collate
    from llama_adapter.train import cosine_lr

    sys.path.insert(0, str(HERE))
    from generate import hf_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_model(model, torch.float32)
    del model
    gc.collect()
    hf.config.use_cache = False  # training: no KV cache to build
    torch.manual_seed(0)
    net = get_peft_model(hf, AdaptionPromptConfig(adapter_len=K, adapter_layers=cfg["layers"], task_type="CAUSAL_LM"))
    net.train()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "gate" not in n], "weight_decay": 0.02},
        {"params": [p for n, p in named if "gate" in n], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR["adapter"], betas=(0.9, 0.95))
    params = [p for _, p in named]
    gc.collect()
    setup_mb, reset = rss_mb(), reset_peak()
    t = time.perf_counter()
    warmup = int(0.1 * len(order))
    for step, b in enumerate(order):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, len(order), warmup, LR["adapter"], 0.0)
        mb = collate([train[i] for i in b], tok.pad_id)
        loss = net(input_ids=mb["input_ids"], labels=mb["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == len(order) - 1:
            log(f"  peft step {step + 1}/{len(order)} loss {loss.item():.4f} {time.perf_counter() - t:.0f}s")
    secs = time.perf_counter() - t
    train_peak = hwm_mb() if reset else None
    net.eval()
    total = count = 0.0
    with torch.no_grad():
        for b in val_batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += net(input_ids=b["input_ids"], labels=b["labels"]).loss.item() * n
            count += n
    return {
        "epoch_s": secs, "steps": len(order), "val_loss": total / count, "lr": LR["adapter"],
        "train_loss_last": loss.item(), "trainable": sum(p.numel() for p in params),
        "peak_mb": max(setup_mb, rss_mb()), "train_peak_mb": train_peak,
    }  # fmt: skip


def run(cfg: dict[str, Any], cache: Path | None = None) -> dict[str, Any]:
    """`cfg` in a fresh interpreter: stdout carries its JSON result, stderr its progress. With `cache`,
    a row already measured with the same settings is read from cache/<row>.json instead."""
    saved = cache / f"{cfg['row']}.json" if cache else None
    if saved and saved.is_file():
        out = json.loads(saved.read_text())
        if all(out.get(k) == v for k, v in cfg.items()):
            log(f"--- {cfg['row']}: measured before, read from {saved}")
            return out
    out = _run(cfg)
    if saved and "skipped" not in out:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(out))
    return out


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    log(f"--- {cfg['row']}: {json.dumps(cfg)}")
    load = os.getloadavg()[0]
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {**cfg, "skipped": f"failed with exit code {p.returncode} (see stderr)"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["load"] = (load, os.getloadavg()[0])
    log(f"    {json.dumps({k: v for k, v in out.items() if k not in cfg})}")
    return out


# ---------------------------------------------------------------------------------------------- table
def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict[str, Any]], command: str, threads: int) -> list[str]:
    import torch

    ok = {r["row"]: r for r in results if "skipped" not in r}
    peft = ok.get("peft")
    some = next(iter(ok.values()), {})
    loads = [x for r in ok.values() for x in r["load"]]
    out = [
        f"{SECTION}: one epoch of the Alpaca demo, {MODEL}, fp32, {threads} torch threads\n",
        f"`{command}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}; 1-minute load average "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} while the rows ran (2 cores: above ~2 the times "
        f"are inflated). {some.get('n_train', '?')} training examples ({some.get('truncated', '?')} cut at "
        f"{MAX_LEN} tokens), {some.get('n_val', '?')} held out, K={K}; packed steps of ~{STEP_TOKENS} tokens, "
        f"padded batches of {some.get('batch', '?')} examples (length-grouped; the incomplete last one dropped); "
        f"lr {LR['adapter']:g} (adapters) / {LR['full']:g} (full), 10% warm-up, cosine. Each row a fresh process.\n",
        "| row | layers | trainable | steps | token slots (pad %) | epoch s | tokens/s | peak RSS MB | train peak MB "
        "| held-out loss | time vs PEFT | train peak vs PEFT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "skipped" in r:
            out.append(f"| {r['row']} | {r['layers']} | skipped: {r['skipped']} |||||||||||")
            continue
        ref = ok.get("peft-top10" if r["layers"] == 10 and "peft-top10" in ok else "peft")
        vs_t = f"{r['epoch_s'] / ref['epoch_s']:.2f}x" if ref else "-"
        vs_m = f"{r['train_peak_mb'] / ref['train_peak_mb']:.2f}x" if ref and r["train_peak_mb"] else "-"
        pad = 100 * (1 - r["tokens"] / r["slots"])
        out.append(
            f"| {r['row']} | {r['layers']} | {r['trainable']:,} | {r['steps']} | {r['slots']:,} ({pad:.0f}%) | "
            f"{r['epoch_s']:.0f} | {r['tokens'] / r['epoch_s']:.0f} | {fmt(r['peak_mb'])} | "
            f"{fmt(r['train_peak_mb'])} | {r['val_loss']:.4f} | {vs_t} | {vs_m} |"
        )
    out.append("")
    ours, full, top10 = ok.get("ours"), ok.get("full"), ok.get("ours-top10")
    if ours and peft:
        out.append(
            f"Targets: ours' epoch {peft['epoch_s'] / ours['epoch_s']:.2f}x faster than PEFT's (>= 2x), train peak "
            f"{ours['train_peak_mb'] / peft['train_peak_mb']:.2f}x PEFT's (<= 0.6x)"
            + (f", {full['epoch_s'] / ours['epoch_s']:.2f}x faster than full fine-tuning (>= 3x)" if full else "")
            + "."
        )
    if ours and top10:
        out.append(f"Top 10 vs top 30 layers: {ours['epoch_s'] / top10['epoch_s']:.2f}x faster (frozen bottom).")
    return out + [""]


def write(text: str) -> None:
    """Replace the SECTION of results.md (up to the next "## "), or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    head, sep, rest = old.partition(SECTION)
    nxt = rest.find("\n## ")
    tail = rest[nxt + 1 :] if sep and nxt >= 0 else ""
    RESULTS.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""))
    log(f"wrote {RESULTS}")


# -------------------------------------------------------------------------------------------- profile
def profile(threads: int, layers: int, top: int) -> list[str]:
    """torch.profiler over one packed ~2,048-token step (forward, backward, clip, AdamW) of the trainer's
    own pieces, after one warm-up step: operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
    from llama_adapter.data import collate_packed, packed_steps
    from llama_adapter.tokenizer import load_tokenizer
    from llama_adapter.train import TrainArgs, load_base, token_loss_sum, trainable_groups

    torch.set_num_threads(threads)
    model = load_base(TrainArgs(model=MODEL))
    tok = load_tokenizer(model.config.extra["tokenizer"])
    train, _ = load_data(tok, 100, 0)
    steps = packed_steps(train.lengths, math.ceil(sum(train.lengths) / STEP_TOKENS), 1, seed=0)
    batches = [collate_packed([[train[i] for i in s[0]]], tok.pad_id) for s in steps[:2]]
    torch.manual_seed(0)
    net = AdaptedLLaMA(model, AdapterConfig(adapter_len=K, adapter_layers=layers)).train()
    opt = torch.optim.AdamW(trainable_groups(net, 0.02), lr=1e-3)

    def step(b: dict) -> None:
        loss, n = token_loss_sum(net, b)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[1])
    wall = time.perf_counter() - t
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    b = batches[1]
    out = [
        f"### Profile: one packed step of {b['input_ids'].shape[1]} tokens ({len(b['lengths'])} examples), "
        f"{MODEL}, K={K}, L={layers}, {threads} threads\n",
        f"Wall {wall:.1f} s under the profiler, 1-minute load {os.getloadavg()[0]:.1f}; self CPU time by operator.\n",
        "| operator | self CPU ms | share | calls |",
        "|---|---:|---:|---:|",
    ]
    for e in ops[:top]:
        out.append(f"| {e.key[:70]} | {e.self_cpu_time_total / 1e3:.0f} | {100 * e.self_cpu_time_total / total:.1f}% | "
                   f"{e.count} |")  # fmt: skip
    mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return out + [f"\nGEMM (aten::mm/addmm/bmm) share: {100 * mm / total:.1f}%\n"]


# ---------------------------------------------------------------------------------------------- floor
def floor(threads: int, repeats: int = 3) -> list[str]:
    """The arithmetic floor of one packed ~2,048-token step: the step itself, then only its GEMMs (the 7
    frozen projections of 30 layers, forward and input gradient, and the frozen head on the loss tokens,
    random tensors of the same shapes) and only its attention (per example, forward + backward, and the
    alternatives), each the mean of `repeats` after a warm-up."""
    import torch
    import torch.nn.functional as F

    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
    from llama_adapter.data import collate_packed, packed_steps
    from llama_adapter.model import sdpa
    from llama_adapter.tokenizer import load_tokenizer
    from llama_adapter.train import TrainArgs, load_base, token_loss_sum, trainable_groups

    torch.set_num_threads(threads)
    model = load_base(TrainArgs(model=MODEL))
    c = model.config
    tok = load_tokenizer(c.extra["tokenizer"])
    train, _ = load_data(tok, 100, 0)
    steps = packed_steps(train.lengths, math.ceil(sum(train.lengths) / STEP_TOKENS), 1, seed=0)
    batches = [collate_packed([[train[i] for i in s[0]]], tok.pad_id) for s in steps[: repeats + 1]]
    torch.manual_seed(0)
    net = AdaptedLLaMA(model, AdapterConfig(adapter_len=K, adapter_layers=c.n_layers)).train()
    opt = torch.optim.AdamW(trainable_groups(net, 0.02), lr=1e-3)

    def timed(fn: Any, n: int = repeats) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n

    it = iter(batches)

    def step() -> None:
        loss, n = token_loss_sum(net, next(it))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(step)
    b = batches[-1]
    M, lens = b["input_ids"].shape[1], [e - s for s, e in b["packing"].spans[0]]
    n_loss = int((b["labels"] != -100).sum())
    hd = c.head_dim
    kv = c.n_kv_heads * hd
    shapes = [(c.dim, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, c.dim)] + [(c.hidden_dim, c.dim)] * 2
    shapes.append((c.dim, c.hidden_dim))
    ws = [torch.randn(o, i) for o, i in shapes]
    xs = {i: torch.randn(M, i) for _, i in shapes}
    gys = {o: torch.randn(M, o) for o, _ in shapes}
    head, h, gl = torch.randn(c.vocab_size, c.dim), torch.randn(n_loss, c.dim), torch.randn(n_loss, c.vocab_size)

    def gemms() -> None:
        for _ in range(c.n_layers):
            for w in ws:
                xs[w.shape[1]] @ w.t()  # forward
                gys[w.shape[0]] @ w  # input gradient
        h @ head.t()
        gl @ head

    flops = c.n_layers * sum(4 * M * o * i for o, i in shapes) + 4 * n_loss * c.vocab_size * c.dim
    gemm_s = timed(gemms)
    q0, k0 = torch.randn(1, c.n_heads, M, hd), torch.randn(1, c.n_kv_heads, M, hd)
    v0 = torch.randn_like(k0)

    def per_example(q: Any, k: Any, v: Any) -> Any:  # what Attention.attend does for a packed row
        parts = zip(q.split(lens, 2), k.split(lens, 2), v.split(lens, 2))
        return torch.cat([sdpa(x, y, z, None) for x, y, z in parts], 2)

    def padded(q: Any, k: Any, v: Any) -> Any:
        L = max(lens)
        pad = lambda t: torch.stack([F.pad(p[0], (0, 0, 0, L - p.shape[2])) for p in t.split(lens, 2)])  # noqa: E731
        y = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=True)
        return torch.cat([y[i, :, :n] for i, n in enumerate(lens)], 1)[None]

    def masked_row(q: Any, k: Any, v: Any) -> Any:
        ex = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        mask = (ex[:, None] == ex[None, :]).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def attention(fn: Any) -> Any:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        g = torch.randn_like(q0)

        def run() -> None:
            for _ in range(c.n_layers):
                fn(q, k, v).backward(g)

        return run

    options = (("per example (ours)", per_example), ("padded batch", padded), ("masked full row", masked_row))
    att = {name: timed(attention(fn), 1) for name, fn in options}
    ours = att["per example (ours)"]
    return [
        f"### The floor of one packed step: {M} tokens ({len(lens)} examples, {n_loss} carrying loss), {MODEL}, "
        f"K={K}, L={c.n_layers}, {threads} threads, fp32\n",
        "| part | seconds | share of the step | rate |",
        "|---|---:|---:|---:|",
        f"| the whole step (forward, backward, AdamW) | {step_s:.2f} | 100% | {flops / step_s / 1e9:.0f} GFLOP/s "
        "(GEMM FLOPs / step time) |",
        f"| its GEMMs alone ({flops / 1e12:.2f} TFLOP: 7 projections x {c.n_layers} layers forward + input "
        f"gradient, head on the loss tokens) | {gemm_s:.2f} | {100 * gemm_s / step_s:.0f}% | "
        f"{flops / gemm_s / 1e9:.0f} GFLOP/s |",
        *[
            f"| attention forward + backward x {c.n_layers}, {name} | {s:.2f} | {100 * s / step_s:.0f}% | - |"
            for name, s in att.items()
        ],  # fmt: skip
        f"| everything else (elementwise, RoPE, norms, copies, Python) | {step_s - gemm_s - ours:.2f} | "
        f"{100 * (step_s - gemm_s - ours) / step_s:.0f}% | - |",
        "",
        f"PEFT does the same GEMMs plus the logits of every position; a 2x faster epoch than PEFT's would need "
        f"this step at <= {0.5 * 347 / 288 * step_s:.1f} s (scaled from the epoch table), i.e. below its GEMMs "
        "alone unless the GEMMs get faster.",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--limit", type=int, help="train on the first N training examples (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="--limit 32 with 16 held-out examples")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--weights", default="q8_0", help="the ours-q8 row's load_model(weights=...)")
    ap.add_argument("--profile", action="store_true", help="profile one packed step instead")
    ap.add_argument("--floor", action="store_true", help="time one packed step against its GEMMs and attention alone")
    ap.add_argument("--layers", type=int, default=30, help="--profile: adapted layers")
    ap.add_argument("--top", type=int, default=25, help="--profile: operators listed")
    ap.add_argument("--cache", help="keep each row's result in CACHE/<row>.json and reuse it (resume a long run)")
    ap.add_argument("--write", action="store_true", help=f"replace the {SECTION!r} section of {RESULTS.name}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.profile:
        print("\n".join(profile(args.threads, args.layers, args.top)))
        return 0
    if args.floor:
        print("\n".join(floor(args.threads)))
        return 0
    limit = 32 if args.quick else args.limit
    n_val = 16 if args.quick else (max(8, min(50, limit // 10)) if limit else None)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    base = {"threads": args.threads, "limit": limit, "n_val": n_val}
    results = []
    for name in args.rows.split(","):
        cfg = {"row": name, **base, **ROWS[name]}
        if "weights" in cfg:
            cfg["weights"] = args.weights
        results.append(run(cfg, Path(args.cache) if args.cache else None))
    command = "python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(table(results, command.strip(), args.threads))
    print(text)
    if args.write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
