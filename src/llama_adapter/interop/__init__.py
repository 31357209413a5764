"""Interoperability: official LLaMA-Adapter v1 files, Hugging Face PEFT AdaptionPrompt adapters,
HF base-model export, adapter inspection and merging.

Every adapter format is read into one in-memory form (`PromptTensors`: prompts [L*K, dim] in
layer-major row order, raw gates [L, n_heads], an `AdapterConfig` and the base `Config`) and
written from it, so each converter is one reader plus one writer: `official` (the official v1
`.pth` and what its code does with it), `peft`, `ours`; `convert` pairs them and exports base
models; `inspect` describes adapter files; `merge` folds V2 bias/scale into base weights.
This package sits above `adapter` and `checkpoint`; neither imports it.
"""

from __future__ import annotations

from .common import (
    OFFICIAL,
    OFFICIAL_DEFAULT_LEN,
    OFFICIAL_GATE,
    OFFICIAL_QUERY,
    OURS,
    PEFT,
    PEFT_CONFIG,
    PEFT_KEY,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_BIN,
    PromptTensors,
    base_config,
    detect_format,
)
from .convert import convert_adapter, convert_base, read_any
from .inspect import inspect_adapter, list_adapters
from .merge import export_merged, merge_adapter, merge_bias_scale
from .official import infer_official_shape, read_official, write_official
from .ours import read_ours, write_ours
from .peft import read_peft, write_peft

__all__ = [
    "OFFICIAL", "OFFICIAL_DEFAULT_LEN", "OFFICIAL_GATE", "OFFICIAL_QUERY", "OURS", "PEFT", "PEFT_CONFIG", "PEFT_KEY",
    "PEFT_PREFIX", "PEFT_WEIGHTS", "PEFT_WEIGHTS_BIN", "PromptTensors", "base_config", "convert_adapter",
    "convert_base", "detect_format", "export_merged", "infer_official_shape", "inspect_adapter", "list_adapters",
    "merge_adapter", "merge_bias_scale", "read_any", "read_official", "read_ours", "read_peft", "write_official",
    "write_ours", "write_peft",
]  # fmt: skip
