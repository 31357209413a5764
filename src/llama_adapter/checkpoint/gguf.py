"""GGUF: the one reader of its header (metadata + tensor index), dequantisation, and model loading.

The tokenizer module reads its embedded vocabulary through `read_gguf` too. A damaged or truncated
file is a one-line ValueError naming it: every read is bounds-checked and every tensor's declared
bytes are checked against the file size before anything is dequantised.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import Config
from ..model import LLaMA, rope_frequencies
from ..quant import SUPPORTED_TYPES, gguf_dequantize, gguf_to_packed, is_quantized_type
from ..quant.gguf_types import type_name
from .build import Lazy, build_model
from .common import ModelSource, chat_template_name, new_config, with_config
from .keymaps import GGUF_KEYS

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_KINDS: dict[type, tuple[type, ...]] = {
    int: (int, np.integer),
    float: (int, float, np.integer, np.floating),
    str: (str,),
    bool: (bool, np.bool_),
}


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: truncated or damaged GGUF file ({what}); re-download or re-convert it")


@dataclass
class GGUFFile:
    """The header of a GGUF file: metadata, tensor index and the file mapped copy-on-write."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (torch-order shape, ggml type, byte offset)
    data: np.ndarray  # uint8 memmap of the whole file

    def value(self, key: str, kind: type, default: Any = None) -> Any:
        """metadata[key] as `kind` (int, float, str or bool), `default` when absent; a value of another
        type means a damaged file."""
        v = self.metadata.get(key)
        if v is None:
            return default
        is_bool = isinstance(v, (bool, np.bool_))
        if not isinstance(v, _KINDS[kind]) or (is_bool and kind is not bool):
            raise _damaged(self.path, f"metadata {key} is a {type(v).__name__}, expected {kind.__name__}")
        return kind(v)

    def array(self, key: str, kind: type, length: int | None = None) -> list | None:
        """metadata[key] as a list of `kind` (str, int or float) of `length` items, None when absent."""
        v = self.metadata.get(key)
        if v is None:
            return None
        if kind is str:
            ok = isinstance(v, list) and all(isinstance(s, str) for s in v)
        else:
            ok = isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.integer if kind is int else np.number)
        if not ok or (length is not None and len(v) != length):
            want = f"{length} {kind.__name__} values" if length is not None else f"a list of {kind.__name__}"
            raise _damaged(self.path, f"metadata {key} is not {want}")
        return v if kind is str else v.tolist()


class _Cursor:
    """Little-endian reads from the mapped file; reading past its end means the file is cut short."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.off = path, buf, 0

    def need(self, n: int) -> None:
        if self.off + n > len(self.buf):
            raise _damaged(self.path, f"needs {n} bytes at offset {self.off}, the file has {len(self.buf)}")

    def take(self, n: int) -> memoryview:
        self.need(n)
        self.off += n
        return self.buf[self.off - n : self.off]

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, t: int, depth: int = 0) -> Any:
        if t == _STRING:
            return self.string()
        if t in _SCALARS:
            return self.scalar(_SCALARS[t])
        if t != _ARRAY or depth > 2:
            raise _damaged(self.path, f"metadata value type {t} at offset {self.off}")
        it, count = self.scalar("<I"), self.scalar("<Q")
        if it in _SCALARS:
            dt = np.dtype(_SCALARS[it])
            self.need(dt.itemsize * count)
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.off)
            self.off += dt.itemsize * count
            return arr
        self.need(count * 8)  # every string or array takes at least 8 bytes: a huge count is damage
        return [self.value(it, depth + 1) for _ in range(count)]

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.scalar("<I")
        if n_dims > _MAX_DIMS:
            raise _damaged(self.path, f"tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", self.take(8 * n_dims))
        qtype, rel = self.scalar("<I"), self.scalar("<Q")
        return name, tuple(reversed(dims)), qtype, rel  # GGUF lists the fastest dim first


def tensor_nbytes(qtype: int, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this ggml type and shape takes; None for a type the gguf package does not know."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        return None
    return -(-math.prod(shape) // block) * size


def _tensor_index(g: GGUFFile, infos: list[tuple[str, tuple[int, ...], int, int]], end: int) -> None:
    """Absolute offsets of the tensors, each checked to lie inside the file."""
    align = g.value("general.alignment", int, 32)
    if align <= 0 or align & (align - 1):
        raise _damaged(g.path, f"general.alignment is {align}, not a power of two")
    start = (end + align - 1) // align * align
    size = len(g.data)
    for name, shape, qtype, rel in infos:
        nbytes = tensor_nbytes(qtype, shape) or 0
        if rel % align or start + rel + nbytes > size:
            raise _damaged(
                g.path, f"tensor {name!r} declares bytes {start + rel}..{start + rel + nbytes}, the file has {size}"
            )
        g.tensors[name] = (shape, qtype, start + rel)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF (v2/v3, little-endian) header without gguf.GGUFReader, which builds a numpy view per
    vocabulary entry and takes seconds on a 49k-token vocabulary. Numeric arrays come back as numpy
    views of the mapped file, string arrays as lists of str."""
    path = Path(path)
    if path.stat().st_size < 4:
        raise ValueError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="c")
    cur = _Cursor(path, memoryview(data))
    magic = bytes(cur.take(4))
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")
    version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    cur.need(n_kv * 12 + n_tensors * 24)  # the smallest key/value and tensor info: a huge count is damage
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    infos = [cur.tensor_info() for _ in range(n_tensors)]
    g = GGUFFile(path=path, metadata=meta, tensors={}, data=data)
    _tensor_index(g, infos, cur.off)
    return g


def read_gguf_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """Key/value metadata of a GGUF file, keys filtered by `prefix`."""
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------- tensors
def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one GGUF tensor -> float32 tensor of `shape` (torch order); quant.gguf_types holds the
    one dequantizer of every type (checked against gguf-py on random blocks)."""
    return gguf_dequantize(qtype, raw, shape)


def gguf_tensor(g: GGUFFile, name: str) -> torch.Tensor:
    shape, qtype, off = g.tensors[name]
    return dequantize(g.data[off:], qtype, shape)


# --------------------------------------------------------------------------------------------- model
def _gguf_rope_scaling(g: GGUFFile, base: Config) -> dict[str, float] | None:
    kind = g.value("llama.rope.scaling.type", str, "none")
    if kind not in ("none", "llama3"):
        raise ValueError(f"{g.path}: RoPE scaling {kind!r} is not supported; supported: none, llama3")
    if "rope_freqs.weight" not in g.tensors:
        return None
    # llama.cpp divides each frequency by rope_freqs; find the Llama-3.x parameters that give the same.
    factors = gguf_tensor(g, "rope_freqs.weight").double().reshape(-1)
    if factors.numel() != base.head_dim // 2:
        raise _damaged(g.path, f"rope_freqs.weight has {factors.numel()} values for head_dim {base.head_dim}")
    plain = rope_frequencies(dataclasses.replace(base, rope_scaling=None)).double()
    factor = float(factors.max())
    original = g.value("llama.rope.scaling.original_context_length", int, 8192)
    for low, high in ((1.0, 4.0), (1.0, 2.0)):
        s = dict(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
        if torch.allclose(rope_frequencies(dataclasses.replace(base, rope_scaling=s)).double(), plain / factors,
                          rtol=1e-4):  # fmt: skip
            return s
    raise ValueError(f"{g.path}: rope_freqs.weight does not match Llama-3-style RoPE scaling; not supported")


def gguf_config(g: GGUFFile) -> Config:
    """The model shape a llama GGUF declares in its `llama.*` metadata."""
    arch = g.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported; only 'llama' models load")

    def key(k: str, kind: type = int, default: Any = None) -> Any:
        v = g.value(f"llama.{k}", kind, default)
        if v is None:
            raise ValueError(f"{g.path}: GGUF metadata lacks llama.{k}")
        return v

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    if dim <= 0 or n_heads <= 0:
        raise _damaged(g.path, f"embedding_length {dim}, head_count {n_heads}")
    head_dim = key("attention.key_length", int, dim // n_heads)
    if key("rope.dimension_count", int, head_dim) != head_dim:
        raise ValueError(f"{g.path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    tokens = g.array("tokenizer.ggml.tokens", str)
    vocab = len(tokens) if tokens is not None else g.value("llama.vocab_size", int)
    if vocab is None:
        vocab = g.tensors["token_embd.weight"][0][0] if "token_embd.weight" in g.tensors else 0
    derived = new_config(
        g.path,
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", int, n_heads),
        vocab_size=int(vocab),
        hidden_dim=key("feed_forward_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=key("rope.freq_base", float, 10000.0),
        max_seq_len=key("context_length", int, 2048),
        tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None,
    )
    derived.rope_scaling = _gguf_rope_scaling(g, derived)
    return derived


def load_gguf(source: ModelSource, config: Config | None, **kw: Any) -> tuple[LLaMA, str | None]:
    g = read_gguf(source.path)
    config = with_config(config, gguf_config(g), source.name)
    # Fail on an unsupported type before spending time on the others.
    for name, (_, qtype, _) in g.tensors.items():
        if GGUF_KEYS.ours(name) is not None and type_name(qtype) not in SUPPORTED_TYPES:
            raise ValueError(
                f"{g.path}: tensor {name!r} has GGUF type {type_name(qtype)}, which is not supported; supported: "
                f"{', '.join(SUPPORTED_TYPES)} (re-quantize the file, e.g. llama.cpp's llama-quantize ... Q4_K_M)"
            )

    def reader(shape: tuple[int, ...], qtype: int, off: int) -> Callable[[], torch.Tensor]:
        return lambda: gguf_dequantize(qtype, g.data[off:], shape)

    def packed(name: str) -> tuple[torch.Tensor, str] | None:
        shape, qtype, off = g.tensors[name]
        return gguf_to_packed(qtype, g.data[off:], shape) if is_quantized_type(qtype) else None

    tensors: list[Lazy] = [(name, shape, reader(shape, qtype, off)) for name, (shape, qtype, off) in g.tensors.items()]
    template = chat_template_name(g.value("tokenizer.chat_template", str))
    return build_model(source, config, GGUF_KEYS, tensors, packed=packed, **kw), template
