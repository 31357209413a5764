"""The image-only bind-adapter recipe of examples/imagebind_audio.py, shared by video_caption.py and
points_bind.py: SmolLM2-135M-Instruct + V1 prompts in every layer + ImageBind-LLM's bind network
(zero-init gated injection), trained on image-space embeddings only (the caller then saves the
`ModalitySet` that tells generate / chat / serve which modalities it takes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, load_adapter, read_adapter_config, save_adapter
from llama_adapter.data import InstructionDataset
from llama_adapter.generate import SamplingParams, generate_text
from llama_adapter.tokenizer import render_chat
from llama_adapter.train import TrainArgs, fit


def train_or_load(
    base: Any,
    tok: Any,
    template: str,
    chats: list[list[dict[str, str]]],
    z: torch.Tensor,
    val: tuple[list[list[dict[str, str]]], torch.Tensor],
    out: Path,
    *,
    seed: int,
    lr: float = 5e-3,
    batch_size: int = 8,
    max_len: int = 64,
    bind_blocks: int = 2,
    reuse: str | None = None,
) -> tuple[AdaptedLLaMA, dict[str, Any]]:
    """Train the adapter on (chat, image-space embedding) pairs, 1 epoch, and save it to `out`;
    with `reuse`, load the adapter an earlier run saved there instead. Returns (model, run info)."""
    if reuse:
        meta = read_adapter_config(reuse)
        return load_adapter(base, reuse).eval(), meta["run"]
    t = time.time()
    torch.manual_seed(seed)  # the adapter's init depends on the seed alone
    cfg = AdapterConfig(adapter_len=10, adapter_layers=base.config.n_layers, bind_dim=z.shape[1],
                        bind_blocks=bind_blocks, bind_hidden=base.config.dim)  # fmt: skip
    model = AdaptedLLaMA(base, cfg)
    ones = torch.ones(len(chats))
    train_ds = InstructionDataset([{"messages": c} for c in chats], tok, template, max_len, visual=(z, ones))
    vchats, vz = val
    val_ds = InstructionDataset([{"messages": c} for c in vchats], tok, template, max_len,
                                visual=(vz, torch.ones(len(vchats))))  # fmt: skip
    args = TrainArgs(model="smollm2-135m-instruct", out=str(out), epochs=1, batch_size=batch_size, max_len=max_len,
                     lr=lr, warmup_steps=10, eval_every=10_000, save_every=10_000, weight_decay=0.02,
                     seed=seed)  # fmt: skip

    def make_ctx(batch: dict[str, torch.Tensor]):  # the embedding goes to the bind network
        return model.prompt_state(bind=batch["visual"])

    res = fit(model, train_ds, val_ds, args, pad_id=tok.pad_id, make_ctx=make_ctx)
    model.eval()
    run = {"steps": res.steps, "train_seconds": time.time() - t, "n_train": len(chats),
           "val_loss": [res.val_losses[0][1], res.val_losses[-1][1]] if res.val_losses else None}  # fmt: skip
    save_adapter(model, out, metadata={"run": run, "template": template})
    return model, run


def decode(
    model: AdaptedLLaMA,
    tok: Any,
    template: str,
    chat: list[dict[str, str]],
    prompt_kw: list[dict[str, torch.Tensor]] | None,
    n: int,
    max_new: int,
    bs: int = 50,
) -> list[str]:
    """Greedy answers for n rows of the same question; `prompt_kw` per batch of up to `bs` rows:
    `AdaptedLLaMA.prompt_state` keywords (from `ModalitySet.adapter_inputs`), or None for no input."""
    prompt = render_chat(chat, template, add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=["<|im_end|>", "\n"])
    out: list[str] = []
    with torch.inference_mode():
        for b, i in enumerate(range(0, n, bs)):
            k = min(bs, n - i)
            kw = {} if prompt_kw is None else prompt_kw[b]
            ctx = model.prompt_state(**kw, precompute=True)
            out += generate_text(model, tok, [prompt] * k, params, ctx=ctx)
    return [c.replace("<|im_end|>", "").strip() for c in out]
