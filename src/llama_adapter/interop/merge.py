"""Folding what can be folded (LLaMA-Adapter V2 bias/scale, trained norms) into base weights."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from .. import checkpoint, v2
from ..adapter import AdaptedLLaMA
from .common import PromptTensors
from .ours import write_ours


def merge_adapter(model: AdaptedLLaMA, *, allow_bias: bool = False) -> dict[str, torch.Tensor]:
    """Fold what can be folded into base weights; returns a plain-LLaMA state dict (our names).

    Prompt adapters (V1 prompts + gates) cannot be merged: they add attention over K extra keys per
    adapted layer with their own softmax, which no change of W_q/W_k/W_v/W_o reproduces for every
    input. A ValueError says so. LLaMA-Adapter V2 bias/scale and trained norms fold exactly
    (`merge_bias_scale`); its prompts then stay a separate (V1) adapter, with a warning."""
    cfg = model.adapter_config
    if not (cfg.bias_scale or cfg.train_norms):
        raise ValueError(
            "prompt adapters cannot be merged into base weights: they add attention over extra prompt "
            "keys/values (a separate softmax per adapted layer), which no weight change reproduces; keep "
            "the adapter separate (load it with --adapter) or export it to PEFT with `llama-adapter convert`"
        )
    sd = merge_bias_scale(model, allow_bias=allow_bias)
    if bool(model.adapter.activated_gates().detach().abs().max() > 0) or model.adapter_visual is not None:
        warnings.warn(
            "only V2 bias/scale/norms were merged; the adaption prompts (non-zero gates) still apply: load "
            "them as an adapter on the merged base (see export_merged(prompts_out=...))",
            stacklevel=2,
        )
    return sd


def merge_bias_scale(model: AdaptedLLaMA, *, allow_bias: bool = False) -> dict[str, torch.Tensor]:
    """LLaMA-Adapter V2 bias/scale (and trained norm) folding: W' = scale * W, b' = scale * b."""
    cfg = model.adapter_config
    if not (cfg.bias_scale or cfg.train_norms):
        raise ValueError("this adapter has no V2 bias/scale or trained norms to fold (bias_scale and train_norms off)")
    return v2.fold_bias_scale(model.model, allow_bias=allow_bias)


def export_merged(model: AdaptedLLaMA, out_dir: str | Path, *, prompts_out: str | Path | None = None) -> Path:
    """A V2 adapter's bias/scale/norms folded into an HF base directory (`checkpoint.save_hf`);
    `prompts_out` also writes the remaining text prompts as a V1 adapter for that merged base."""
    sd = merge_adapter(model)
    merged = v2.folded_llama(model.config, sd)
    checkpoint.save_hf(merged, out_dir)
    if prompts_out is not None:
        cfg = model.adapter_config
        if cfg.visual_dim or cfg.bind_dim:
            raise ValueError("the remaining adapter has a visual projection / bind network; only text prompts export")
        v1 = dataclasses.replace(cfg, bias_scale=False, train_norms=False)
        pt = PromptTensors(
            model.adapter.prompts.detach().float(), model.adapter.gates.detach().float(), v1, model.config
        )
        write_ours(pt, prompts_out, {"merged_base": str(out_dir)})
    return Path(out_dir)
