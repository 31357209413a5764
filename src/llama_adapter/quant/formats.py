"""The packed weight formats q4_0, q4_1 and q8_0, byte for byte as GGUF stores them, and their reference
quantizers and dequantizers in plain torch.

A row of K weights is K/32 blocks; a block is
  q4_0: [d: fp16][16 bytes]          value = d * (q - 8)
  q4_1: [d: fp16][m: fp16][16 bytes] value = d * q + m
  q8_0: [d: fp16][32 x int8]         value = d * q
where the 16 bytes of a q4 block hold elements 0..15 in their low nibbles and 16..31 in their high ones.
Keeping GGUF's layout means a GGUF file's tensors are used as they lie in the file (no conversion at all), and
what we quantize ourselves can be written back into a GGUF.

The quantizers reproduce llama.cpp's reference ones (`quantize_row_q4_0_ref` ...) bit for bit: round-to-nearest,
scales computed in fp32 and stored as fp16, q4_1 from each block's min and max.
"""

from __future__ import annotations

import torch

from . import ext

BLOCK = 32
FORMATS = ("q4_0", "q4_1", "q8_0")
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
FORMAT_ID = {"q4_0": 0, "q4_1": 1, "q8_0": 2}  # the C++ kernels' enum
BITS_PER_WEIGHT = {f: BLOCK_BYTES[f] * 8 / BLOCK for f in FORMATS}

# Rows quantized per step: bounds the fp32 temporaries (a 7B matrix is 180 MB of fp32) without slowing down.
_CHUNK_ELEMENTS = 1 << 22


def check_format(fmt: str) -> str:
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown quantized format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def row_bytes(fmt: str, in_features: int) -> int:
    """Bytes of one packed row of `in_features` weights."""
    if in_features % BLOCK:
        raise ValueError(f"in_features {in_features} is not a multiple of {BLOCK}; {fmt} needs whole blocks")
    return in_features // BLOCK * BLOCK_BYTES[check_format(fmt)]


def in_features_of(fmt: str, packed: torch.Tensor) -> int:
    """K of a packed [N, row_bytes] weight."""
    bb = BLOCK_BYTES[check_format(fmt)]
    if packed.dim() != 2 or packed.shape[1] % bb:
        raise ValueError(f"packed {fmt} weight of shape {list(packed.shape)}: rows must be whole {bb}-byte blocks")
    return packed.shape[1] // bb * BLOCK


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly: floor(a + 0.5) is off by one at a = 0.49999997."""
    a = v.abs()
    f = a.floor()
    return (f + (2 * (a - f)).floor()).copysign(v)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 -> [..., 16] bytes: low nibble = element i, high nibble = element i + 16."""
    return q[..., :16] | (q[..., 16:] << 4)


def _quantize_blocks(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x: fp32 [n_blocks, 32] -> uint8 [n_blocks, block_bytes]."""
    if fmt == "q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = _roundf(x * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1)
    if fmt == "q4_0":
        # The signed value of largest magnitude maps to -8, so the full 16 levels are used (llama.cpp).
        mx = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
        d = mx / -8
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = (x * inv + 8.5).trunc().clamp_(0, 15).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = ((x - lo) * inv + 0.5).trunc().clamp_(0, 15).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], dim=1)


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32/bf16/fp16 [N, K] -> packed uint8 [N, K/32 * block_bytes] in GGUF's layout."""
    check_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D weight [out_features, in_features], got {list(w.shape)}")
    n, k = w.shape
    rb = row_bytes(fmt, k)
    out = torch.empty(n, rb, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    ops = ext.ops()  # same bytes, ~50x faster than the torch ops below
    for r in range(0, n, step):
        rows = w[r : r + step].detach().cpu()
        if ops is not None and rows.dtype in (torch.float32, torch.bfloat16, torch.float16):
            out[r : r + step] = ops.quantize(rows, FORMAT_ID[fmt])
        else:
            rows = rows.float()
            out[r : r + step] = _quantize_blocks(rows.reshape(-1, BLOCK), fmt).view(-1, rb)
    return out


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values 0..15 (low nibbles first)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _half(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [..., 1] fp32."""
    return b.contiguous().view(torch.float16).float()


@torch.no_grad()
def dequantize(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """Packed uint8 [N, row_bytes] -> fp32 [N, K]: the reference every kernel is tested against."""
    k = in_features_of(fmt, packed)
    n = packed.shape[0]
    b = packed.reshape(-1, BLOCK_BYTES[fmt])
    if fmt == "q8_0":
        out = b[:, 2:].view(torch.int8).float() * _half(b[:, :2])
    elif fmt == "q4_0":
        out = (_unpack_nibbles(b[:, 2:]).float() - 8) * _half(b[:, :2])
    else:
        out = _unpack_nibbles(b[:, 4:]).float() * _half(b[:, :2]) + _half(b[:, 2:4])
    return out.view(n, k)


# ------------------------------------------------------------------------------------------ x8 layout
# The same blocks with 8 rows interleaved per block (csrc/quant.cpp, "x8 layout"): per group of 8 rows and block,
# the 8 scales (q4_1: then the 8 mins), then q4: 4 x 32 bytes whose byte 4r + i holds row r's elements 8t + i (low
# nibble) and 8t + 4 + i (high); q8: 8 x 32 bytes whose bytes 4r..4r+3 are row r's elements 4j..4j+3.
# These torch versions are the reference for the C++ conversions and the fallback when the kernels are missing.
LAYOUTS = ("gguf", "x8")


def _header_bytes(fmt: str) -> int:
    return 4 if fmt == "q4_1" else 2


@torch.no_grad()
def to_x8(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGUF-layout [N, row_bytes] (N a multiple of 8) -> the x8 layout, same shape."""
    n, rb = packed.shape
    if n % 8:
        raise ValueError(f"the x8 layout needs out_features in multiples of 8, got {n}")
    bb, hb = BLOCK_BYTES[fmt], _header_bytes(fmt)
    kb = rb // bb
    rows = packed.view(n // 8, 8, kb, bb)
    heads = rows[..., :hb].reshape(n // 8, 8, kb, hb // 2, 2).permute(0, 2, 3, 1, 4).reshape(n // 8, kb, 8 * hb)
    if fmt == "q8_0":
        q = rows[..., 2:].reshape(n // 8, 8, kb, 8, 4).permute(0, 2, 3, 1, 4)
    else:
        e = _unpack_nibbles(rows[..., hb:]).reshape(n // 8, 8, kb, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
        q = e[..., 0] | (e[..., 1] << 4)
    return torch.cat([heads, q.reshape(n // 8, kb, -1)], dim=-1).reshape(n, rb)


@torch.no_grad()
def from_x8(packed: torch.Tensor, fmt: str) -> torch.Tensor:
    """The x8 layout -> GGUF's, same shape."""
    n, rb = packed.shape
    bb, hb = BLOCK_BYTES[fmt], _header_bytes(fmt)
    kb = rb // bb
    g = packed.view(n // 8, kb, 8 * bb)
    heads = g[..., : 8 * hb].reshape(n // 8, kb, hb // 2, 8, 2).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, kb, hb)
    if fmt == "q8_0":
        q = g[..., 16:].reshape(n // 8, kb, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, kb, 32)
    else:
        lt = g[..., 8 * hb :].reshape(n // 8, kb, 4, 8, 4)  # [t, r, i]
        e = torch.stack([lt & 0x0F, lt >> 4], dim=-1)  # [t, r, i, h]: element 8t + 4h + i
        q = _pack_nibbles(e.permute(0, 3, 1, 2, 5, 4).reshape(n // 8, 8, kb, 32))
    return torch.cat([heads, q], dim=-1).reshape(n, rb)
