"""QuantLinear / QuantEmbedding: frozen linear layers whose weights stay packed (q4_0, q4_1, q8_0).

`activations` picks the numerics, the number of rows M = x.numel() / in_features picks the kernel (C++):
  activations="q8" (default; x quantized to 8 bits per 32-block, as llama.cpp does: ~0.3% relative error)
    "rows"    M < PACKED_MIN_ROWS: GGUF blocks as they lie (M = 1: one prefetched row stream per thread;
              M = 2, 3: 4 x 2 register tiles)
    "packed"  M >= PACKED_MIN_ROWS: each 8-row weight tile is re-laid out once per call so that 8 rows share
              every instruction; ~2x fp32 MKL's GOP/s from M = 8 up (batched decode, prefill, training)
  activations="fp32" (x exact; results equal F.linear(x, dequantize(W)) up to fp32 summation order)
    "fp32"    M < MM_MIN_ROWS: weight blocks expanded to floats in registers
    "mm"      M >= MM_MIN_ROWS: ~512 KB of rows dequantized at a time and multiplied with MKL
Without the extension every kernel is the torch reference: F.linear(x, dequantize(W)).

`layout="x8"` keeps the same bytes with 8 rows interleaved per block (what "packed" builds per call, built once):
decode and batched decode read it directly (M < X8_PACKED_MIN_ROWS; one SmolLM2 decode step's matmuls: ~1.2x
at batch 1, ~2x at batch 8), at the price of the GGUF file's bytes no longer being the weight (a copy at load
instead of a mmap view). Recommended for inference; "gguf" stays the default as the interchange layout.

The input gradient (training through a frozen base) is grad_y @ W with W dequantized >= 256 rows at a time and
multiplied with MKL (fp32 speed, no second copy); keep_transposed_copy() trades +1.06 bytes per weight for the
int8 kernels (benchmarks/kernels.py --grad measures the options, fbgemm included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ext
from .formats import (
    BLOCK_BYTES,
    FORMAT_ID,
    LAYOUTS,
    check_format,
    dequantize,
    from_x8,
    in_features_of,
    quantize,
    to_x8,
)
from .gguf_types import gguf_to_packed

Activations = Literal["q8", "fp32"]
Layout = Literal["gguf", "x8"]

KERNELS = ("rows", "fp32", "mm", "packed")  # the C++ op's kernel ids 0..3
# Crossovers measured with benchmarks/kernels.py (2-core AVX2 EPYC): the packed kernel pays a re-layout of
# each weight tile per call, which 4 rows of x repay (q8_0, with costlier sign handling, needs 8).
PACKED_MIN_ROWS = {"q4_0": 4, "q4_1": 4, "q8_0": 8}
MM_MIN_ROWS = 16  # fp32 activations: from here MKL on dequantized chunks beats expanding blocks per row
X8_PACKED_MIN_ROWS = 48  # x8 layout: below, kernel "rows" reads the groups directly; from here "packed" unpacks


def _kernel(fmt: str, m: int, activations: Activations, layout: Layout = "gguf") -> int:
    if activations == "fp32":
        return 2 if m >= MM_MIN_ROWS or layout == "x8" else 1
    if layout == "x8":
        return 3 if m >= X8_PACKED_MIN_ROWS else 0
    return 3 if m >= PACKED_MIN_ROWS[fmt] else 0


def _fmt_id(fmt: str, layout: Layout) -> int:
    return FORMAT_ID[fmt] + (3 if layout == "x8" else 0)


def convert_layout(packed: torch.Tensor, fmt: str, src: Layout, dst: Layout) -> torch.Tensor:
    """The same weight in another layout (a byte permutation; "x8" needs out_features % 8 == 0)."""
    if src not in LAYOUTS or dst not in LAYOUTS:
        raise ValueError(f"unknown layout {src if src not in LAYOUTS else dst!r}; supported: {', '.join(LAYOUTS)}")
    if src == dst:
        return packed
    if dst == "x8" and packed.shape[0] % 8:
        raise ValueError(f"the x8 layout needs out_features in multiples of 8, got {packed.shape[0]}")
    ops, k = ext.ops(), in_features_of(fmt, packed)
    if ops is None:
        return to_x8(packed, fmt) if dst == "x8" else from_x8(packed, fmt)
    convert = ops.to_x8 if dst == "x8" else ops.from_x8
    return convert(packed.contiguous(), FORMAT_ID[fmt], k)


class _LinearFn(torch.autograd.Function):
    """y = x @ W^T with the input gradient grad_y @ W; W is frozen (no gradient). With `wt` (a q8_0 copy of
    W^T) the gradient runs on the int8 kernels instead of dequantizing W per call."""

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor, fmt_id: int, kernel: int, k: int, wt: torch.Tensor | None
    ) -> torch.Tensor:
        return ext.ops().linear(x, w, fmt_id, kernel)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        _, w, fmt_id, _, k, wt = inputs
        ctx.save_for_backward(w, wt)
        ctx.fmt_id, ctx.k = fmt_id, k

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # noqa: ANN001, ANN205
        w, wt = ctx.saved_tensors
        if wt is not None:
            kernel = _kernel("q8_0", gy.numel() // gy.shape[-1], "q8")
            gx = ext.ops().linear(gy.contiguous(), wt, FORMAT_ID["q8_0"], kernel)
        else:
            gx = ext.ops().linear_grad(gy.contiguous(), w, ctx.fmt_id, ctx.k)
        return gx, None, None, None, None, None


def quant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    fmt: str,
    activations: Activations = "q8",
    kernel: str | None = None,
    layout: Layout = "gguf",
    weight_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (any float dtype) @ W^T for a packed W [N, row_bytes] -> [..., N] in x's dtype.

    `kernel` (one of KERNELS) forces a kernel instead of the per-M choice; benchmarks and tests use it.
    `weight_t`: a q8_0 W^T [K, N/32 * 34] for the input gradient (QuantLinear.keep_transposed_copy)."""
    k = packed.shape[1] // BLOCK_BYTES[fmt] * 32
    if x.shape[-1] != k:
        raise ValueError(f"quant_linear: input has {x.shape[-1]} features, the weight expects {k}")
    lead, dtype = x.shape[:-1], x.dtype
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    ops = ext.ops() if x.device.type == "cpu" else None
    if ops is None:
        y = F.linear(x2, dequantize_weight(packed, fmt, layout))
    else:
        kid = KERNELS.index(kernel) if kernel is not None else _kernel(fmt, x2.shape[0], activations, layout)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _LinearFn.apply(x2, packed, _fmt_id(fmt, layout), kid, k, weight_t)
        else:
            y = ops.linear(x2, packed, _fmt_id(fmt, layout), kid)
    y = y.reshape(*lead, packed.shape[0])
    return y if dtype == torch.float32 else y.to(dtype)


def dequantize_weight(packed: torch.Tensor, fmt: str, layout: Layout = "gguf") -> torch.Tensor:
    """Packed [N, row_bytes] -> fp32 [N, K], with the C++ kernel when loaded."""
    ops = ext.ops()
    if ops is None or packed.device.type != "cpu":
        return dequantize(from_x8(packed, fmt) if layout == "x8" else packed, fmt)
    return ops.dequantize(packed.contiguous(), _fmt_id(fmt, layout), in_features_of(fmt, packed))


def quant_embedding(ids: torch.Tensor, packed: torch.Tensor, fmt: str, layout: Layout = "gguf") -> torch.Tensor:
    """Rows `ids` of a packed [N, row_bytes] table, dequantized to fp32: [*ids.shape, K]."""
    ops = ext.ops()
    k = in_features_of(fmt, packed)
    if ops is None or packed.device.type != "cpu":
        rows = from_x8(packed, fmt) if layout == "x8" else packed
        return dequantize(rows[ids.reshape(-1)], fmt).reshape(*ids.shape, k)
    return ops.embedding(packed, _fmt_id(fmt, layout), k, ids)


def _packed_from_raw(raw: np.ndarray | torch.Tensor, fmt: str, shape: Sequence[int]) -> torch.Tensor:
    n, k = shape
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))
    packed = raw.reshape(-1).view(torch.uint8)
    rb = k // 32 * {"q4_0": 18, "q4_1": 20, "q8_0": 34}[check_format(fmt)]
    if k % 32 or packed.numel() != n * rb:
        need = f"{n * rb} bytes (K a multiple of 32)"
        raise ValueError(f"{fmt} weight of shape [{n}, {k}] needs {need}, got {packed.numel()}")
    return packed.view(n, rb)


class QuantLinear(nn.Module):
    """A frozen linear layer with a packed weight: y = x @ W^T (+ bias), fp32 or any float dtype in and out.

    `weight` is a uint8 buffer [out_features, in_features/32 * block_bytes] in GGUF's block layout, or with
    `layout="x8"` the same bytes with 8 rows interleaved (see the module docstring). It is not a Parameter:
    nothing trains it, optimizers never see it. `activations="fp32"` keeps x exact (slower)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        packed: torch.Tensor,
        fmt: str,
        bias: torch.Tensor | None = None,
        activations: Activations = "q8",
        layout: Layout = "gguf",
    ) -> None:
        super().__init__()
        check_format(fmt)
        if packed.dtype != torch.uint8:
            raise ValueError(f"QuantLinear: packed weight must be uint8, got {packed.dtype}")
        if activations not in ("q8", "fp32"):
            raise ValueError(f"QuantLinear: activations must be 'q8' or 'fp32', got {activations!r}")
        if layout not in LAYOUTS or (layout == "x8" and packed.shape[0] % 8):
            raise ValueError(
                f"QuantLinear: layout {layout!r} for {packed.shape[0]} rows; 'gguf', or 'x8' for N % 8 == 0"
            )
        self.fmt = fmt
        self.layout: Layout = layout
        self.in_features = in_features_of(fmt, packed)
        self.out_features = packed.shape[0]
        self.activations: Activations = activations
        self.register_buffer("weight", packed.contiguous())
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"QuantLinear: bias of shape {list(bias.shape)} for {self.out_features} outputs")
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("weight_t", None, persistent=False)

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        fmt: str,
        bias: torch.Tensor | None = None,
        activations: Activations = "q8",
        layout: Layout = "gguf",
    ) -> QuantLinear:
        """Quantize an fp32/bf16/fp16 weight [out, in] (round-to-nearest, as llama.cpp's reference)."""
        return cls(convert_layout(quantize(w, fmt), fmt, "gguf", layout), fmt, bias, activations, layout)

    @classmethod
    def from_packed(
        cls,
        raw: np.ndarray | torch.Tensor,
        fmt: str,
        shape: Sequence[int],
        activations: Activations = "q8",
        layout: Layout = "gguf",
    ) -> QuantLinear:
        """From bytes in GGUF's `fmt` block layout (e.g. a GGUF Q4_1 tensor), logical shape [out, in]; with
        layout="x8" they are re-laid out (copied), else used as they are (a GGUF mmap stays a mmap)."""
        packed = convert_layout(_packed_from_raw(raw, fmt, shape), fmt, "gguf", layout)
        return cls(packed, fmt, activations=activations, layout=layout)

    @classmethod
    def from_gguf(
        cls,
        qtype: int | str,
        raw: np.ndarray | torch.Tensor,
        shape: Sequence[int],
        activations: Activations = "q8",
        layout: Layout = "gguf",
    ) -> QuantLinear:
        """From a GGUF tensor of any supported quantized type (K-quants are re-packed; see gguf_types)."""
        packed, fmt = gguf_to_packed(qtype, raw, tuple(shape))
        return cls(convert_layout(packed, fmt, "gguf", layout), fmt, activations=activations, layout=layout)

    @staticmethod
    def cat(layers: Sequence[QuantLinear]) -> QuantLinear:
        """Concatenate along out_features (fused q/k/v or gate/up): one call, one activation quantization."""
        if not layers:
            raise ValueError("QuantLinear.cat: no layers")
        first = layers[0]
        for layer in layers[1:]:
            if (layer.fmt, layer.in_features, layer.layout) != (first.fmt, first.in_features, first.layout):
                raise ValueError(
                    f"QuantLinear.cat: {layer.fmt}/{layer.layout} [{layer.out_features}, {layer.in_features}] does "
                    f"not match {first.fmt}/{first.layout} [{first.out_features}, {first.in_features}]; fused "
                    "layers need one format, layout and K"
                )
        bias = None
        if any(layer.bias is not None for layer in layers):
            zeros = torch.zeros
            bias = torch.cat([zeros(x.out_features) if x.bias is None else x.bias for x in layers])
        weight = torch.cat([layer.weight for layer in layers])  # x8 groups never straddle layers (N % 8 == 0)
        return QuantLinear(weight, first.fmt, bias, first.activations, first.layout)

    def keep_transposed_copy(self, enable: bool = True) -> QuantLinear:
        """Training: keep W^T in q8_0 (+1.06 bytes per weight, not saved) so the input gradient grad_y @ W runs
        on the int8 kernels (~1.5x dequantize + MKL, benchmarks/kernels.py --grad) instead of dequantizing W per
        call. The gradient then carries 8-bit rounding of grad_y and of W (requantized): measure the loss."""
        if enable and self.out_features % 32:
            raise ValueError(f"keep_transposed_copy: out_features {self.out_features} is not a multiple of 32")
        self.weight_t = quantize(self.dequantize().t().contiguous(), "q8_0") if enable else None
        return self

    def relayout(self, layout: Layout) -> QuantLinear:
        """Convert the weight to `layout` in place (a byte permutation); returns self."""
        self.weight = convert_layout(self.weight, self.fmt, self.layout, layout)
        self.layout = layout
        return self

    # ------------------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops, k = ext.ops(), self.in_features
        if (
            ops is not None
            and x.dtype == torch.float32
            and x.shape[-1] == k
            and x.is_cpu
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            # Decode calls this ~200 times per token, so the common case skips the general path's checks, the
            # op-overload lookup and nn.Module's attribute lookup (together as long as a small matmul).
            x2 = x if x.dim() == 2 else x.reshape(-1, k)
            kid = _kernel(self.fmt, x2.shape[0], self.activations, self.layout)
            y = ops.linear.default(x2, self._buffers["weight"], _fmt_id(self.fmt, self.layout), kid)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = quant_linear(x, self.weight, self.fmt, self.activations, layout=self.layout, weight_t=self.weight_t)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 [out_features, in_features]."""
        return dequantize_weight(self.weight, self.fmt, self.layout)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as fp32 (a tied token embedding): [*ids.shape, in_features]."""
        return quant_embedding(ids, self.weight, self.fmt, self.layout)

    # A state dict records the format and layout next to the bytes; loading converts to this module's layout.
    def get_extra_state(self) -> dict[str, str]:
        return {"fmt": self.fmt, "layout": self.layout}

    def set_extra_state(self, state: dict[str, str]) -> None:
        _adopt_layout(self, state)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
            f"layout={self.layout}, activations={self.activations}, bias={self.bias is not None}"
        )


def _adopt_layout(module: QuantLinear | QuantEmbedding, state: dict[str, str]) -> None:
    """After load_state_dict copied bytes in `state["layout"]` into module.weight: put them in module.layout."""
    if state.get("fmt") != module.fmt:
        raise ValueError(f"state dict holds a {state.get('fmt')} weight, this module is {module.fmt}")
    src = state.get("layout", "gguf")
    if src != module.layout:
        converted = convert_layout(module.weight, module.fmt, src, module.layout)  # type: ignore[arg-type]
        module.weight.copy_(converted)


class QuantEmbedding(nn.Module):
    """A frozen token embedding over a packed table; `tied_to(output)` shares a QuantLinear's weight buffer
    (relayout the QuantLinear before tying: the two then hold the same tensor)."""

    weight: torch.Tensor

    def __init__(self, packed: torch.Tensor, fmt: str, layout: Layout = "gguf") -> None:
        super().__init__()
        self.fmt = check_format(fmt)
        self.layout: Layout = layout
        self.num_embeddings = packed.shape[0]
        self.embedding_dim = in_features_of(fmt, packed)
        self.register_buffer("weight", packed)

    @classmethod
    def tied_to(cls, linear: QuantLinear) -> QuantEmbedding:
        return cls(linear.weight, linear.fmt, linear.layout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return quant_embedding(ids, self.weight, self.fmt, self.layout)

    def get_extra_state(self) -> dict[str, str]:
        return {"fmt": self.fmt, "layout": self.layout}

    def set_extra_state(self, state: dict[str, str]) -> None:
        _adopt_layout(self, state)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}, layout={self.layout}"


def quantize_linear(
    linear: nn.Linear, fmt: str, activations: Activations = "q8", layout: Layout = "gguf"
) -> QuantLinear:
    """nn.Linear -> QuantLinear with the same in/out features (and bias, kept in fp32)."""
    return QuantLinear.from_float(linear.weight, fmt, linear.bias, activations, layout)


def quantize_linears(
    model: nn.Module, fmt: str, include: Callable[[str, nn.Linear], bool] = lambda name, mod: True
) -> list[str]:
    """Replace every nn.Linear of `model` for which include(qualified_name, module) holds; returns the names.

    Layers whose in_features is not a multiple of 32 are skipped (the block formats need whole blocks)."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.in_features % 32 == 0 and include(name, mod):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, quantize_linear(mod, fmt))
            done.append(name)
    return done
