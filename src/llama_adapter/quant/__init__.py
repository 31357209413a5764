"""Packed low-precision weights (GGUF's q4_0, q4_1, q8_0 block layouts) and fast CPU kernels for them.

    from llama_adapter.quant import QuantLinear, quantize_linear, gguf_to_packed

    layer = quantize_linear(nn.Linear(576, 1536, bias=False), "q4_1")   # or QuantLinear.from_gguf(...)
    y = layer(x)                                                           # x [..., 576] -> [..., 1536]
    layer.relayout("x8")       # inference: 8 rows interleaved per block, ~1.2x decode, ~2x batch-8 decode

The kernels (csrc/quant.cpp) build once per machine on first use; without a compiler or AVX2 everything
still works through the torch reference path (see `ext`).
"""

from .ext import available as kernels_available
from .ext import reference_path, unavailable_reason
from .formats import BITS_PER_WEIGHT, BLOCK, BLOCK_BYTES, FORMATS, LAYOUTS, dequantize, quantize
from .gguf_types import (
    FLOAT_TYPES,
    KERNEL_TYPES,
    REPACKED_TYPES,
    SUPPORTED_TYPES,
    gguf_dequantize,
    gguf_to_packed,
    is_quantized_type,
)
from .linear import (
    KERNELS,
    MM_MIN_ROWS,
    PACKED_MIN_ROWS,
    X8_PACKED_MIN_ROWS,
    QuantEmbedding,
    QuantLinear,
    convert_layout,
    dequantize_weight,
    quant_embedding,
    quant_linear,
    quantize_linear,
    quantize_linears,
)

__all__ = [
    "BITS_PER_WEIGHT",
    "BLOCK",
    "BLOCK_BYTES",
    "FLOAT_TYPES",
    "FORMATS",
    "KERNELS",
    "KERNEL_TYPES",
    "LAYOUTS",
    "MM_MIN_ROWS",
    "PACKED_MIN_ROWS",
    "REPACKED_TYPES",
    "SUPPORTED_TYPES",
    "X8_PACKED_MIN_ROWS",
    "QuantEmbedding",
    "QuantLinear",
    "convert_layout",
    "dequantize",
    "dequantize_weight",
    "gguf_dequantize",
    "gguf_to_packed",
    "is_quantized_type",
    "kernels_available",
    "quant_embedding",
    "quant_linear",
    "quantize",
    "quantize_linear",
    "quantize_linears",
    "reference_path",
    "unavailable_reason",
]
