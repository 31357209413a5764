"""llama2.c legacy (version 0) `.bin` checkpoints: a 7-int header, then float32 tensors in a fixed order."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..model import LLaMA
from .build import Lazy, build_model
from .common import ModelSource, new_config, with_config
from .keymaps import LLAMA2C_KEYS, LLAMA2C_ORDER, OURS_LAYER

HEADER_BYTES = 28


def llama2c_header(path: Path) -> tuple[int, ...] | None:
    """(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), or None when implausible
    (vocab_size < 0 means an unshared classifier follows the other tensors)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        return None
    h = struct.unpack("<7i", head)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = h
    ok = min(dim, hidden, n_layers, n_heads, n_kv, seq) > 0 and vocab != 0 and dim % n_heads == 0
    return h if ok and n_heads % n_kv == 0 else None


def llama2c_tokenizer(path: Path) -> Path | None:
    """The tokenizer llama2.c keeps next to a checkpoint: tok{vocab}.bin, else tokenizer.bin."""
    header = llama2c_header(path)
    names = ([f"tok{abs(header[5])}.bin"] if header else []) + ["tokenizer.bin"]
    return next((path.parent / n for n in names if (path.parent / n).exists()), None)


def _shapes(header: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = header
    hd, kv_dim = dim // n_heads, dim // n_heads * n_kv
    per_layer = {"attention_norm*": (dim,), "wq*": (dim, dim), "wk*": (kv_dim, dim), "wv*": (kv_dim, dim),
                 "wo*": (dim, dim), "ffn_norm*": (dim,), "w1*": (hidden, dim), "w2*": (dim, hidden),
                 "w3*": (hidden, dim)}  # fmt: skip
    shapes = {"tok_embeddings": (abs(vocab), dim), "norm": (dim,), "freq_cis_real": (seq, hd // 2),
              "freq_cis_imag": (seq, hd // 2), "output": (abs(vocab), dim)}  # fmt: skip
    shapes |= {name: (n_layers, *shape) for name, shape in per_layer.items()}
    order = [n for n in LLAMA2C_ORDER if n != "output" or vocab < 0]  # vocab > 0: classifier shared
    return {name: shapes[name] for name in order}


def load_llama2c(source: ModelSource, config: Config | None, **kw: Any) -> LLaMA:
    path = source.path
    header = llama2c_header(path)
    if header is None:
        raise ValueError(f"{path}: not a llama2.c checkpoint (implausible 7-int header)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = header
    shapes = _shapes(header)
    n_floats = sum(math.prod(s) for s in shapes.values())
    expected, actual = HEADER_BYTES + 4 * n_floats, path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: llama2.c header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv}, vocab_size={vocab}, seq_len={seq}) implies {expected} bytes, the file has "
            f"{actual}; the file is truncated or not a legacy llama2.c export"
        )
    derived = new_config(
        path,
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=abs(vocab), hidden_dim=hidden,
        norm_eps=1e-5, max_seq_len=seq, tie_embeddings=vocab > 0,
    )  # fmt: skip
    config = with_config(config, derived, source.name)
    # Copy-on-write map: zero-copy, and writes (never expected) do not reach the file.
    flat = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=HEADER_BYTES, shape=(n_floats,)))
    tensors: list[Lazy] = []
    off = 0
    for name, shape in shapes.items():
        block = flat[off : off + math.prod(shape)].view(shape)
        off += math.prod(shape)
        if not name.endswith("*"):
            if not name.startswith("freq_cis"):
                tensors.append((f"{name}.weight", shape, lambda b=block: b))
            continue
        ours = OURS_LAYER[name[:-1]]
        for i in range(n_layers):
            tensors.append((ours.replace("{i}", str(i)), shape[1:], lambda b=block, i=i: b[i]))
    return build_model(source, config, LLAMA2C_KEYS, tensors, **kw)
