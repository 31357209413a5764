"""GGUF tensor types -> our packed formats, straight from the raw blocks, vectorised (no loop per block).

| GGUF type       | kept as | how                                                                    |
|-----------------|---------|------------------------------------------------------------------------|
| Q4_0, Q4_1, Q8_0| itself  | the file's bytes are the packed weight (zero copy from the mmap)       |
| Q4_K            | q4_1    | each 32-weight sub-block: d' = d*sc, m' = -dmin*m (exact up to fp16)   |
| Q5_0            | q8_0    | q - 16 fits int8 with the same d: exact                                |
| IQ4_NL          | q8_0    | the 16-entry codebook values are int8: exact                           |
| IQ4_XS          | q8_0    | codebook values, d' = d * (ls - 32) per 32 (exact up to fp16)          |
| Q5_1, Q5_K, Q6_K, Q2_K, Q3_K | q8_0 | dequantized and requantized to 8 bits per 32 (error <= amax/254)|
| F32, F16, BF16  | -       | float: keep an nn.Linear (gguf_dequantize gives the tensor)            |

The dequantizers mirror gguf-py's numpy ones (tests compare them on random blocks); ours run in torch, in
chunks, so a 7B-sized tensor converts in a fraction of a second.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import ext
from .formats import BLOCK, _fp16_bytes, _quantize_blocks

KERNEL_TYPES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
REPACKED_TYPES = {
    "Q4_K": "q4_1",
    "Q5_0": "q8_0",
    "Q5_1": "q8_0",
    "Q5_K": "q8_0",
    "Q6_K": "q8_0",
    "Q2_K": "q8_0",
    "Q3_K": "q8_0",
    "IQ4_NL": "q8_0",
    "IQ4_XS": "q8_0",
}
# IQ4_NL / IQ4_XS: 4-bit indices into this non-uniform grid (ggml's kvalues_iq4nl)
_IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = (*FLOAT_TYPES, *KERNEL_TYPES, *REPACKED_TYPES)

# (weights per block, bytes per block), as gguf.GGML_QUANT_SIZES
_SIZES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
_CHUNK_BLOCKS = 1 << 14  # superblocks per step: ~16 MB of fp32 temporaries


def type_name(qtype: int | str) -> str:
    """GGML type enum (int or gguf.GGMLQuantizationType) or name -> name ("Q4_K")."""
    if isinstance(qtype, str):
        return qtype.upper()
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"GGUF type {name} is not supported; supported: {', '.join(SUPPORTED_TYPES)} "
        "(re-quantize the file, e.g. llama.cpp's llama-quantize ... Q4_K_M or Q8_0)"
    )


def is_quantized_type(qtype: int | str) -> bool:
    """True for the block-quantized types we run packed; False for F32/F16/BF16; ValueError otherwise."""
    name = type_name(qtype)
    if name in FLOAT_TYPES:
        return False
    if name in KERNEL_TYPES or name in REPACKED_TYPES:
        return True
    raise _unsupported(name)


def _as_bytes(raw: np.ndarray | torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 torch tensor (sharing memory with `raw`), checked against `shape`."""
    if name not in _SIZES:
        raise _unsupported(name)
    block, size = _SIZES[name]
    n = math.prod(shape)
    if shape[-1] % block:
        raise ValueError(f"GGUF {name} tensor of shape {list(shape)}: rows are not whole {block}-weight blocks")
    nbytes = n // block * size
    if isinstance(raw, np.ndarray):
        raw = raw.reshape(-1).view(np.uint8)
        with warnings.catch_warnings():  # read-only mmaps: we never write into the weights
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(raw) if raw.flags.writeable else torch.frombuffer(raw, dtype=torch.uint8)
    raw = raw.reshape(-1).view(torch.uint8)
    if raw.numel() < nbytes:
        raise ValueError(f"GGUF {name} tensor of shape {list(shape)} needs {nbytes} bytes, got {raw.numel()}")
    return raw[:nbytes]


def _half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _shift(b: torch.Tensor, shifts: list[int], dim_shape: tuple[int, ...]) -> torch.Tensor:
    return b >> torch.tensor(shifts, dtype=torch.uint8).reshape(dim_shape)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per superblock."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _low_high(qs: torch.Tensor, nb: int, groups: int, width: int) -> torch.Tensor:
    """[nb, groups*width] bytes -> [nb, groups*2, width]: each group's low nibbles, then its high nibbles."""
    return (_shift(qs.reshape(nb, groups, 1, width), [0, 4], (1, 1, 2, 1)) & 0x0F).reshape(nb, groups * 2, width)


def _bits(b: torch.Tensor, nb: int, nbits: int) -> torch.Tensor:
    """[nb, n] bytes -> [nb, nbits, n] single bits (bit i of every byte in row i)."""
    return _shift(b.reshape(nb, 1, -1), list(range(nbits)), (1, nbits, 1)) & 1


def _dequant_blocks(name: str, b: torch.Tensor) -> torch.Tensor:
    """[nb, bytes] -> fp32 [nb, weights per block]."""
    nb = b.shape[0]
    if name == "Q8_0":
        return b[:, 2:].view(torch.int8).float() * _half(b[:, :2])
    if name in ("Q4_0", "Q4_1"):
        qs = b[:, 4:] if name == "Q4_1" else b[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        return q * _half(b[:, :2]) + (_half(b[:, 2:4]) if name == "Q4_1" else -8 * _half(b[:, :2]))
    if name in ("Q5_0", "Q5_1"):
        o = 4 if name == "Q5_1" else 2
        q = _q5_values(b[:, o : o + 4], b[:, o + 4 : o + 20], nb).float()
        return q * _half(b[:, :2]) + (_half(b[:, 2:4]) if name == "Q5_1" else -16 * _half(b[:, :2]))
    if name == "Q2_K":
        scales, qs = b[:, :16], b[:, 16:80]
        d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
        q = (_shift(qs.reshape(nb, 2, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(nb, 16, 16)
        dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
        ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
        return (dl * q.float() - ml).reshape(nb, 256)
    if name == "Q3_K":
        hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _half(b[:, 108:110])
        lo = _shift(scales[:, :8].reshape(nb, 1, 8), [0, 4], (1, 2, 1)).reshape(nb, 16) & 0x0F
        hi = _shift(scales[:, 8:].reshape(nb, 1, 4), [0, 2, 4, 6], (1, 4, 1)).reshape(nb, 16) & 3
        sc = (lo | (hi << 4)).to(torch.int16) - 32
        ql = (_shift(qs.reshape(nb, 2, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(nb, 16, 16)
        qh = _bits(hmask, nb, 8).reshape(nb, 16, 16)
        q = ql.to(torch.int16) - ((qh ^ 1).to(torch.int16) << 2)  # a set hmask bit means "no -4 offset"
        return ((d * sc.float()).unsqueeze(-1) * q.float()).reshape(nb, 256)
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        if name == "Q4_K":
            q = _low_high(b[:, 16:144], nb, 4, 32)
        else:
            q = _low_high(b[:, 48:176], nb, 4, 32) | (_bits(b[:, 16:48], nb, 8) << 4)
        return ((d * sc.float()).unsqueeze(-1) * q.float() - (dmin * mn.float()).unsqueeze(-1)).reshape(nb, 256)
    if name == "Q6_K":
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _half(b[:, 208:210])
        lo = _low_high(ql, nb, 2, 64).reshape(nb, 8, 32)
        hi = (_shift(qh.reshape(nb, 2, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(nb, 8, 32)
        q = ((lo | (hi << 4)).to(torch.int16) - 32).reshape(nb, 16, 16)
        return ((d * scales.view(torch.int8).float()).unsqueeze(-1) * q.float()).reshape(nb, 256)
    if name == "IQ4_NL":
        return _iq4_values(b[:, 2:]).float() * _half(b[:, :2])
    if name == "IQ4_XS":
        d, q = _iq4_xs_scales(b), _iq4_values(b[:, 8:].reshape(nb * 8, 16)).reshape(nb, 8, 32)
        return (d.unsqueeze(-1) * q.float()).reshape(nb, 256)
    raise _unsupported(name)


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] nibble bytes (low nibbles = elements 0..15) -> [n, 32] int8 grid values."""
    grid = torch.tensor(_IQ4_GRID, dtype=torch.int8)
    return grid[torch.cat([qs & 0x0F, qs >> 4], dim=1).long()]


def _iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS superblocks [nb, 136] -> fp32 scales d * (ls - 32) of the eight 32-weight sub-blocks [nb, 8]."""
    nb = b.shape[0]
    d = _half(b[:, 0:2])
    hi = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = (hi >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3  # 2 bits per sub-block
    lo = (_shift(b[:, 4:8].reshape(nb, 4, 1), [0, 4], (1, 1, 2)) & 0x0F).reshape(nb, 8)
    return d * ((lo.to(torch.int32) | (hi << 4)) - 32).float()


def _q5_values(qh: torch.Tensor, qs: torch.Tensor, nb: int) -> torch.Tensor:
    """Q5_0/Q5_1: 5-bit values 0..31 [nb, 32] from 4 bytes of high bits (bit j = element j) and 16 nibble bytes."""
    high = _bits(qh, nb, 8).transpose(1, 2).reshape(nb, 32)  # byte j//8, bit j%8
    return torch.cat([qs & 0x0F, qs >> 4], dim=1) | (high << 4)


@torch.no_grad()
def gguf_dequantize(qtype: int | str, raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Any supported GGUF tensor (raw bytes, torch-order `shape`) -> fp32 tensor of `shape`."""
    name = type_name(qtype)
    b = _as_bytes(raw, name, shape)
    if name == "F32":
        return b.view(torch.float32).reshape(shape)
    if name in ("F16", "BF16"):
        return b.view(torch.float16 if name == "F16" else torch.bfloat16).float().reshape(shape)
    block, size = _SIZES[name]
    blocks = b.view(-1, size)
    out = torch.empty(blocks.shape[0], block)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[i : i + _CHUNK_BLOCKS] = _dequant_blocks(name, blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(shape)


_LO = 0x0F0F0F0F0F0F0F0F  # low nibble of each byte of an int64
_HI = ~_LO


def _aligned(b: torch.Tensor) -> torch.Tensor:
    return b if b.data_ptr() % 8 == 0 else b.clone()


def _fp16_pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two fp32 tensors -> int32 holding fp16(lo) in the low and fp16(hi) in the high 16 bits (little-endian
    bytes: [lo][hi], q4_1's d then m)."""
    bits = torch.stack([lo, hi], dim=-1).to(torch.float16)
    return bits.view(torch.int32).squeeze(-1)


def _q4_k_to_q4_1(b: torch.Tensor) -> torch.Tensor:
    """[nb, 144] Q4_K superblocks -> [nb*8, 20] q4_1 blocks, sub-block by sub-block.

    Works on 8 bytes at a time (int64 words), which makes it ~10x faster than byte-wise ops."""
    nb = b.shape[0]
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    out = torch.empty(nb * 8, 5, dtype=torch.int32)
    out[:, 0] = _fp16_pair(d * sc.float(), -(dmin * mn.float())).reshape(-1)
    # Q4_K: sub-block 2j is the low nibbles of bytes 32j..32j+31, sub-block 2j+1 their high nibbles.
    # q4_1: byte i holds element i (low nibble) and i + 16 (high nibble).
    qs = _aligned(b[:, 16:144]).contiguous().view(torch.int64).view(nb, 4, 2, 2)  # [pair j, half h, word]
    first, second = qs[:, :, 0], qs[:, :, 1]  # elements i and i + 16 of both sub-blocks
    even = (first & _LO) | ((second & _LO) << 4)
    odd = ((first >> 4) & _LO) | (second & _HI)
    out[:, 1:] = torch.stack([even, odd], dim=2).view(torch.int32).reshape(nb * 8, 4)
    return out.view(torch.uint8)


def _iq4_nl_to_q8_0(b: torch.Tensor) -> torch.Tensor:
    """[nb, 18] -> [nb, 34]: d unchanged, the grid values as int8 (exact)."""
    return torch.cat([b[:, :2], _iq4_values(b[:, 2:]).view(torch.uint8)], dim=1)


def _iq4_xs_to_q8_0(b: torch.Tensor) -> torch.Tensor:
    """[nb, 136] -> [nb*8, 34]: per sub-block d' = d * (ls - 32) in fp16, q = grid value."""
    nb = b.shape[0]
    q = _iq4_values(b[:, 8:].reshape(nb * 8, 16)).view(torch.uint8)
    return torch.cat([_fp16_bytes(_iq4_xs_scales(b).reshape(-1, 1)), q], dim=1)


def _q5_0_to_q8_0(b: torch.Tensor) -> torch.Tensor:
    """[nb, 22] -> [nb, 34]: d unchanged, q - 16 in int8 (exact)."""
    q = (_q5_values(b[:, 2:6], b[:, 6:22], b.shape[0]).to(torch.int16) - 16).to(torch.int8).view(torch.uint8)
    return torch.cat([b[:, :2], q], dim=1)


@torch.no_grad()
def gguf_to_packed(
    qtype: int | str, raw: np.ndarray | torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, str]:
    """A quantized GGUF tensor -> (packed uint8 [N, row_bytes], format) for QuantLinear.

    Q4_0/Q4_1/Q8_0 share memory with `raw` (a GGUF mmap stays a mmap); other types are converted as the
    module docstring's table says. Float types and types without a conversion raise ValueError.
    """
    name = type_name(qtype)
    if name in FLOAT_TYPES:
        raise ValueError(f"GGUF type {name} is a float type: keep it as nn.Linear (gguf_dequantize reads it)")
    if name not in KERNEL_TYPES and name not in REPACKED_TYPES:
        raise _unsupported(name)
    if len(shape) != 2:
        raise ValueError(f"GGUF {name} tensor of shape {list(shape)}: a linear weight must be 2-D [out, in]")
    b = _as_bytes(raw, name, shape)
    n, k = shape
    if name in KERNEL_TYPES:
        fmt = KERNEL_TYPES[name]
        return b.view(n, -1), fmt
    fmt = REPACKED_TYPES[name]
    ops = ext.ops()
    if ops is not None:  # the same bytes as the torch code below, at memory speed
        return ops.gguf_repack(b, name).view(n, -1), fmt
    block, size = _SIZES[name]
    blocks = b.view(-1, size)
    per = block // BLOCK  # our blocks per GGUF block
    out = torch.empty(blocks.shape[0] * per, {"q4_1": 20, "q8_0": 34}[fmt], dtype=torch.uint8)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[i : i + _CHUNK_BLOCKS]
        if name == "Q4_K":
            conv = _q4_k_to_q4_1(chunk)
        elif name == "Q5_0":
            conv = _q5_0_to_q8_0(chunk)
        elif name == "IQ4_NL":
            conv = _iq4_nl_to_q8_0(chunk)
        elif name == "IQ4_XS":
            conv = _iq4_xs_to_q8_0(chunk)
        else:
            conv = _quantize_blocks(_dequant_blocks(name, chunk).reshape(-1, BLOCK), fmt)
        out[i * per : (i + len(chunk)) * per] = conv
    return out.view(n, -1), fmt
