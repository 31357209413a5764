"""Load and save base-model weights: llama2.c `.bin`, GGUF, Hugging Face safetensors, Meta `.pth`.

One module per format (`llama2c`, `gguf`, `hf`, `meta`), each reading its header into a `Config` and a
list of lazily read tensors; `build` checks them against the model and assigns them; `keymaps` holds
the one name table per format; `sources` finds a model (path or known name) and its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..model import LLaMA
from ..quant import QuantLinear
from .build import WEIGHTS
from .common import FORMATS, CheckpointNotFoundError, ModelSource, chat_template_name, one_line, read_json
from .gguf import GGUFFile, dequantize, load_gguf, read_gguf, read_gguf_metadata
from .hf import config_from_hf, config_to_hf, hf_config, load_hf, load_safetensors, safetensors_shapes, save_hf
from .keymaps import (
    GGUF_KEYS,
    HF_KEYS,
    LLAMA2C_KEYS,
    LLAMA2C_ORDER,
    META_KEYS,
    META_SPLIT,
    KeyMap,
    half_to_interleaved,
    interleaved_to_half,
)
from .llama2c import load_llama2c
from .meta import load_meta, load_torch_file, meta_config, meta_hidden_dim, require_tensors
from .sources import NAMED_MODELS, SMOLLM2, SMOLLM2_INSTALL, resolve

__all__ = [
    "CheckpointNotFoundError", "FORMATS", "GGUFFile", "GGUF_KEYS", "HF_KEYS", "WEIGHTS",
    "KeyMap", "LLAMA2C_KEYS", "LLAMA2C_ORDER", "META_KEYS", "META_SPLIT", "ModelSource", "NAMED_MODELS", "SMOLLM2",
    "SMOLLM2_INSTALL", "chat_template_name", "config_from_hf", "config_to_hf", "dequantize", "half_to_interleaved",
    "hf_config", "interleaved_to_half", "load_model", "load_safetensors", "load_torch_file", "meta_config",
    "meta_hidden_dim", "one_line", "read_gguf", "read_gguf_metadata", "read_json", "require_tensors", "resolve",
    "safetensors_shapes", "save_hf",
]  # fmt: skip


def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: Config | None = None,
    progress: bool = True,
    tokenizer: str | Path | None = None,
    weights: str | None = None,
) -> LLaMA:
    """Load a base model from a path (llama2.c .bin, .gguf, HF or Meta directory) or a known name
    (`smollm2-135m-instruct`, `stories260k`). `config` overrides the one read from the checkpoint
    (its shapes must match the file); `tokenizer` the tokenizer found next to it (--tokenizer).
    config.extra records source, format, tokenizer (None when there is none) and chat template.
    `weights` (see `build.WEIGHTS`): None holds every weight in `dtype`; "keep" keeps a file's packed
    tensors packed (GGUF Q4/Q8 and K-quants); "q8_0" / "q4_0" / "q4_1" also quantize float linears."""
    source = resolve(spec, tokenizer)
    kw = dict(dtype=dtype, device=device, progress=progress, weights=weights)
    template = None
    if source.format == "llama2c":
        model = load_llama2c(source, config, **kw)
    elif source.format == "gguf":
        model, template = load_gguf(source, config, **kw)
    elif source.format == "hf":
        model, template = load_hf(source, config, **kw)
    else:
        model = load_meta(source, config, **kw)
    extra = {
        "source": str(source.path),
        "format": source.format,
        "tokenizer": None if source.tokenizer is None else str(source.tokenizer),
        "weights": weights_summary(model),
    }
    if template:
        extra["chat_template"] = template
    model.config.extra.update(extra)
    return model


def weights_summary(model: LLaMA) -> str:
    """How the linear weights are held, e.g. "q4_1+q8_0" or "float32" (recorded in config.extra)."""
    kinds = {m.fmt if isinstance(m, QuantLinear) else str(m.weight.dtype).removeprefix("torch.")
             for m in model.modules() if isinstance(m, (QuantLinear, torch.nn.Linear))}  # fmt: skip
    return "+".join(sorted(kinds))
