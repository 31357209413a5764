"""Hugging Face PEFT AdaptionPrompt adapters (adapter_config.json + adapter_model.safetensors), read and written.


PEFT AdaptionPrompt (peft/tuners/adaption_prompt, checked against peft 0.21.2): per adapted layer
`...model.layers.{i}.self_attn.adaption_prompt` [1, K, hidden] and `...adaption_gate` [1] for the top
`adapter_layers` layers; prompts through k_proj / v_proj (no RoPE), GQA by repeat_interleave, scores
/ sqrt(head_dim), a separate fp32 softmax, multiplied by the RAW scalar gate, then o_proj -- the
same function as ours with gate_activation="identity" and the scalar broadcast to all heads, so
PEFT -> ours is exact. Ours -> PEFT is exact only when all heads of a layer share one activated gate
(we export tanh(g) when the activation is tanh); otherwise the head mean is written, a warning says
so and the report gives the largest per-head deviation. PEFT derives its GQA factor as
hidden // (n_kv_heads * head_dim), so bases whose n_heads * head_dim != hidden cannot be exported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import checkpoint
from ..adapter import _atomic_write
from ..config import AdapterConfig, Config
from ..model import LLaMA
from .common import (
    PEFT_CONFIG,
    PEFT_KEY,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_BIN,
    PromptTensors,
    base_config,
    require_v1_text,
)


def peft_tensors(d: Path) -> dict[str, torch.Tensor]:
    if (d / PEFT_WEIGHTS).is_file():
        return checkpoint.load_safetensors(d / PEFT_WEIGHTS)
    if (d / PEFT_WEIGHTS_BIN).is_file():
        path = d / PEFT_WEIGHTS_BIN
        return checkpoint.require_tensors(checkpoint.load_torch_file(path), path, "a PEFT adapter holds tensors")
    raise ValueError(f"{d}: neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN} found next to {PEFT_CONFIG}")


def peft_config(d: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT AdaptionPrompt adapter for a Llama model, checked."""
    cfg_path = d / PEFT_CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"{d}: {PEFT_CONFIG} missing; not a PEFT adapter directory")
    pc = checkpoint.read_json(cfg_path)
    ptype = pc.get("peft_type")
    if ptype != "ADAPTION_PROMPT":
        raise ValueError(
            f"{cfg_path}: peft_type={ptype!r}; only ADAPTION_PROMPT (LLaMA-Adapter) adapters convert "
            "(LoRA and other PEFT methods change base weights differently)"
        )
    base_name = pc.get("base_model_name_or_path")
    if base_name is not None and not isinstance(base_name, str):
        raise ValueError(f"{cfg_path}: base_model_name_or_path is {base_name!r}, expected a string")
    target = pc.get("target_modules")
    if target not in (None, "self_attn"):
        raise ValueError(
            f"{cfg_path}: target_modules={target!r} (base {base_name!r}) is not a Llama attention; expected "
            "'self_attn' (LlamaForCausalLM). Adapters for GPT-2 ('attn') or other architectures do not convert"
        )
    return pc


def _peft_layers(sd: dict[str, torch.Tensor], d: Path, base_name: Any) -> tuple[dict, dict]:
    """{layer: prompt [1, K, hidden]} and {layer: gate [1]} from PEFT tensor names."""
    prompts: dict[int, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        m = PEFT_KEY.match(k)
        if not m:
            unknown.append(k)
        else:
            (prompts if m.group(2) == "prompt" else gates)[int(m.group(1))] = v
    if unknown:
        raise ValueError(
            f"{d}: tensors {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not Llama adaption prompts; "
            f"expected {PEFT_PREFIX}model.layers.{{i}}.self_attn.adaption_prompt [1, K, hidden] and "
            f"...adaption_gate [1] (base {base_name!r} is not a Llama model?)"
        )
    if not prompts or set(prompts) != set(gates):
        raise ValueError(
            f"{d}: adaption_prompt layers {sorted(prompts)} and adaption_gate layers {sorted(gates)} differ"
        )
    return prompts, gates


def _local_base(d: Path, base_name: str | None) -> str:
    if base_name and Path(base_name).expanduser().exists():
        return base_name
    raise ValueError(
        f"{d}: base_model_name_or_path={base_name!r} is not a local checkpoint; pass the base "
        "model (--base PATH) so widths and layer counts can be checked"
    )


def read_peft(adapter_dir: str | Path, base: Config | LLaMA | str | Path | None = None) -> PromptTensors:
    """A PEFT AdaptionPrompt directory -> PromptTensors (gate_activation="identity", the scalar gate
    broadcast to all heads: exact). `base` defaults to the config's `base_model_name_or_path` when
    that is a local checkpoint."""
    d = Path(adapter_dir)
    pc = peft_config(d)
    base_name = pc.get("base_model_name_or_path")
    prompts, gates = _peft_layers(peft_tensors(d), d, base_name)
    cfg_base = base_config(_local_base(d, base_name) if base is None else base)
    n, dim, H = cfg_base.n_layers, cfg_base.dim, cfg_base.n_heads
    L = len(prompts)
    want_layers = list(range(n - L, n))
    expected = (
        f"expected for base '{cfg_base.name}' (dim={dim}, n_layers={n}, n_heads={H}): "
        f"model.layers.{{{n - L}..{n - 1}}}.self_attn.adaption_prompt [1, K, {dim}] and adaption_gate [1]"
    )
    if sorted(prompts) != want_layers:
        raise ValueError(f"{d}: adapted layers {sorted(prompts)} are not the top {L} of {n}; {expected}")
    K = prompts[want_layers[0]].shape[-2] if prompts[want_layers[0]].ndim == 3 else 0
    for i in want_layers:
        p, g = prompts[i], gates[i]
        if p.ndim != 3 or p.shape[0] != 1 or p.shape[1] != K or p.shape[2] != dim:
            raise ValueError(f"{d}: layer {i} adaption_prompt is {list(p.shape)}; {expected}")
        if g.numel() != 1:
            raise ValueError(f"{d}: layer {i} adaption_gate is {list(g.shape)}; {expected}")
    for key, have in (("adapter_len", K), ("adapter_layers", L)):
        if pc.get(key) not in (None, have):
            raise ValueError(f"{d / PEFT_CONFIG}: {key}={pc.get(key)} but the tensors have {key}={have}")
    cfg = AdapterConfig(adapter_len=K, adapter_layers=L, gate_activation="identity")
    cfg.validate(cfg_base)
    P = torch.cat([prompts[i][0].float() for i in want_layers])
    G = torch.stack([gates[i].float().reshape(1).expand(H) for i in want_layers])
    return PromptTensors(P, G.clone(), cfg, cfg_base, ["PEFT scalar gates -> identity gates on every head (exact)"])


def write_peft(
    pt: PromptTensors,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    strict: bool = False,
) -> float:
    """Write `adapter_config.json` + `adapter_model.safetensors` loadable by `PeftModel.from_pretrained`
    on the matching LlamaForCausalLM. Returns the largest |activated gate - written gate| over heads
    (0.0 = exact); non-zero warns, or raises with `strict`."""
    require_v1_text(pt.config, "PEFT")
    c = pt.base
    if c.n_heads * c.head_dim != c.dim:
        raise ValueError(
            f"base '{c.name}' has n_heads*head_dim={c.n_heads * c.head_dim} != hidden={c.dim}; PEFT's adaption "
            "prompt derives its GQA factor from hidden // (n_kv_heads*head_dim) and cannot run this base"
        )
    act = pt.activated_gates().float()
    scalar = act.mean(dim=1)
    dev = float((act - scalar[:, None]).abs().max())
    if dev > 0:
        msg = (
            f"PEFT has one gate per layer; this adapter's heads differ (activated gates), so the head mean is "
            f"written: largest per-head deviation {dev:.3g}. The export is approximate"
        )
        if strict:
            raise ValueError(msg + "; drop strict to accept it")
        warnings.warn(msg, stacklevel=2)
    K = pt.config.adapter_len
    tensors = {}
    for j, i in enumerate(pt.layers):
        tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_prompt"] = (
            pt.prompts[j * K : (j + 1) * K].float()[None].contiguous()
        )
        tensors[f"{PEFT_PREFIX}model.layers.{i}.self_attn.adaption_gate"] = scalar[j].reshape(1).clone()
    config = {
        "adapter_layers": pt.config.adapter_layers,
        "adapter_len": K,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or c.extra.get("source") or c.name,
        "inference_mode": True,
        "peft_type": "ADAPTION_PROMPT",
        "revision": None,
        "target_modules": "self_attn",
        "task_type": "CAUSAL_LM",
    }
    out = Path(out_dir)
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return dev
