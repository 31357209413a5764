"""Adapter vs LoRA (peft) vs full fine-tuning on the same model, data and schedule.

Each method runs in its own process (so peak RSS is that method's alone): load SmolLM2-135M, train
with `llama_adapter.train.fit`, then measure held-out loss and Alpaca-MC accuracy.
- adapter: ours, L=30, K=10, zero-init gates;
- LoRA: a Hugging Face LlamaForCausalLM built in memory from our weights (names mapped, no
  permutation: our model already uses the HF rotary layout), `peft` LoRA r=8, alpha=16 on q_proj and
  v_proj (the LoRA paper's setting);
- full: our LLaMA with every base parameter trainable.
Learning rates are common defaults for each method, not tuned here: adapter 1e-2, LoRA 1e-3, full 5e-5.

    .venv/bin/python experiments/adapter_vs_lora.py [--quick]
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import common as C
import torch
from torch import nn

LRS = {"adapter": 1e-2, "lora": 1e-3, "full": 5e-5}
HF_NAMES = {  # ours -> Hugging Face Llama
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    mod, leaf = rest.rsplit(".", 1)
    return f"model.layers.{i}.{HF_LAYER_NAMES[mod]}.{leaf}"


def to_hf(model) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hc = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = LlamaForCausalLM(hc)
    sd = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


class ForFit(nn.Module):
    """Lets `fit`/`evaluate` drive any model: its parameters sit under a name starting with
    'adapter' (the optimiser's predicate; frozen ones get no gradient and are never updated),
    `forward(idx, hidden_only=True)` gives final hidden states and `output` is the LM head."""

    def __init__(self, inner: nn.Module, hidden, output: nn.Module) -> None:
        super().__init__()
        self.adapter_inner = inner
        self._hidden = hidden
        self.output = output

    def forward(self, idx, hidden_only: bool = False, **kw):
        h = self._hidden(idx, **kw)
        return h if hidden_only else self.output(h)


def build(method: str, base):
    from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig

    torch.manual_seed(0)
    if method == "adapter":
        return AdaptedLLaMA(base, AdapterConfig(adapter_len=10, adapter_layers=base.config.n_layers))
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return ForFit(base, lambda idx, **kw: base(idx, hidden_only=True, **kw), base.output)
    from peft import LoraConfig, get_peft_model

    hf = to_hf(base)
    for p in hf.parameters():
        p.requires_grad_(False)
    pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    inner = pm.base_model.model
    return ForFit(pm, lambda idx, **kw: inner.model(input_ids=idx).last_hidden_state, inner.lm_head)


def check_hf_matches(base) -> float:
    hf = to_hf(base)
    idx = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(idx).logits - base(idx)).abs().max().item()


def one(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    s = C.Setup.for_args(args)
    base, tok, template = C.load_base(args.model)
    data = C.make_data(tok, template, s)
    hf_diff = check_hf_matches(base) if method == "lora" else None
    total = sum(p.numel() for p in base.parameters())
    model = build(method, base)
    del base  # LoRA trains an HF copy: let our weights go before measuring
    gc.collect()
    C.reset_peak_rss()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res, secs = C.train(model, data, s, tok.pad_id, lr=LRS[method], with_val=False)
    model.eval()
    val = C.held_out_loss(model, data.val, tok.pad_id)
    acc = C.mc_accuracy(model, tok, data.mc, template)
    return {
        "method": method,
        "trainable": trainable,
        "total": total,
        "s_per_epoch": secs / s.epochs,
        "steps": res.steps,
        "val": val,
        "mc_acc": acc,
        "peak_rss_mb": C.peak_rss_mb(),
        "train_peak_rss_mb": C.train_peak_rss_mb(),
        "lr": LRS[method],
        "train": res.train_losses,
        "hf_max_logit_diff": hf_diff,
    }


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--one", choices=list(LRS), help=argparse_hide())
    p.add_argument("--from-json", action="store_true", help="re-render results/adapter_vs_lora.{md,png} only")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)))
        return
    s = C.Setup.for_args(args)
    results = {}
    prev = Path(args.out) / "adapter_vs_lora.json"
    if args.from_json:  # re-render the table and plot from the last run
        results = json.loads(prev.read_text())["results"]
    for method in [] if args.from_json else LRS:
        cmd = [sys.executable, __file__, "--one", method, "--model", args.model, "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if args.max_len:
            cmd += ["--max-len", str(args.max_len)]
        C.log(f"--- {method}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results[method] = json.loads(line[len("RESULT ") :])
        C.log(json.dumps({k: v for k, v in results[method].items() if k != "train"}))

    base, tok, template = C.load_base(args.model)
    data = C.make_data(tok, template, s)
    base_val = C.held_out_loss(base, data.val, tok.pad_id)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, r in results.items():
        ax.plot(range(1, len(r["train"]) + 1), r["train"], "o-", ms=3, label=f"{m} (lr {r['lr']:g})")
    ax.axhline(base_val, color="gray", ls="--", label="frozen base, held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Adapter vs LoRA vs full fine-tuning (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(out / "adapter_vs_lora.png", dpi=110)
    rows = [
        [
            m,
            r["trainable"],
            f"{100 * r['trainable'] / r['total']:.3f}%",
            f"{r['s_per_epoch']:.1f}",
            round(r["train_peak_rss_mb"]),
            r["val"],
            100 * r["mc_acc"],
        ]
        for m, r in results.items()
    ]
    body = C.md_table(
        [
            "method",
            "trainable params",
            "% of base",
            "s / epoch",
            "peak RSS MB (training)",
            "held-out loss",
            "Alpaca-MC acc %",
        ],
        rows,
    )
    body += (
        f"\nFrozen base held-out loss: {base_val:.4f}. {s.epochs:g} epochs of {len(data.train)} examples, "
        f"batch {s.batch_size}; s/epoch excludes evaluation. Peak RSS: the kernel's high-water mark, reset "
        f"once the model is built (frozen weights + gradients + optimizer state + activations; the LoRA run's "
        f"conversion of our weights into an HF copy is not counted). "
        f"Our weights in HF LlamaForCausalLM: max |logit difference| "
        f"{results['lora']['hf_max_logit_diff']:.2e} vs ours. Train curves: `adapter_vs_lora.png`.\n"
    )
    C.write_result(
        out,
        "adapter_vs_lora",
        "Adapter vs LoRA vs full fine-tuning",
        s,
        data,
        body,
        {"results": results, "base_val": base_val},
    )


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
