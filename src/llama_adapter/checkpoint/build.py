"""Turn a format's tensor index into a model: check every name and shape, then convert and assign.

The model is built on the meta device, every tensor name and shape is checked against it (the first
mismatch is an error naming the tensor), then tensors are converted one by one to the requested
dtype/device and assigned, so weights are never allocated twice.

`weights` chooses how the frozen linear layers are held (see `WEIGHTS`): float in `dtype`, or packed
(q8_0 / q4_0 / q4_1, `quant.QuantLinear`). A tensor the file already holds in a packed type (GGUF
Q4_0/Q4_1/Q8_0, or a K-quant re-packed) keeps its own precision with no float round trip; float
tensors are quantized one at a time, so a large model never exists in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..config import Config
from ..model import LLaMA, rope_frequencies
from ..quant import FORMATS, QuantEmbedding, QuantLinear, convert_layout, quantize
from .common import ModelSource
from .keymaps import KeyMap, interleaved_to_half

# One tensor of a checkpoint, not read yet: (their name, shape in torch order, reader).
Lazy = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]
# A source's packed form of a tensor (their name -> (uint8 [N, row_bytes], format)), or None when it
# holds that tensor as floats (GGUF gives one).
PackedReader = Callable[[str], "tuple[torch.Tensor, str] | None"]
_LAYER = re.compile(r"^layers\.(\d+)\.")
_LINEAR = re.compile(r"^(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output)\.weight$")
# `weights=`: None / "fp32" / "bf16" / "fp16" hold every weight in floats ("keep" too, except that a
# source's packed tensors stay packed); "q8_0" / "q4_0" / "q4_1" also pack the float linears.
WEIGHTS = ("keep", "fp32", "bf16", "fp16", *FORMATS)
FLOAT_WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta_model(config: Config, keymap: KeyMap, tensors: list[Lazy]) -> LLaMA:
    """The model on the meta device, with at most one layer more than the checkpoint holds: a damaged
    header can claim billions of layers, and one missing layer is enough to name the missing tensor."""
    layers = [int(m.group(1)) for name, _, _ in tensors if (m := _LAYER.match(keymap.ours(name) or ""))]
    n = min(config.n_layers, max(layers, default=-1) + 2)
    with torch.device("meta"):
        return LLaMA(config if n == config.n_layers else dataclasses.replace(config, n_layers=n))


def _check(source: ModelSource, config: Config, keymap: KeyMap, tensors: list[Lazy], model: LLaMA) -> dict[str, Lazy]:
    """Every expected tensor present with its shape and nothing unexpected; returns ours -> lazy tensor."""
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
    return {ours: found[ours] for ours in expected}


def build_model(
    source: ModelSource,
    config: Config,
    keymap: KeyMap,
    tensors: list[Lazy],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool,
    weights: str | None = None,
    packed: PackedReader | None = None,
) -> LLaMA:
    """A checked, loaded model (eval mode) from a format's tensor index and key table."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    dtype = FLOAT_WEIGHTS.get(weights or "", dtype)
    model = _meta_model(config, keymap, tensors)
    found = _check(source, config, keymap, tensors, model)
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    total = sum(math.prod(shape) for _, shape, _ in found.values()) * torch.empty((), dtype=dtype).element_size()
    sd: dict[str, torch.Tensor] = {}
    packs: dict[str, tuple[torch.Tensor, str]] = {}
    bar = tqdm(
        found, desc=f"loading {source.name}", unit="tensor", file=sys.stderr, leave=False,
        disable=True if not progress or total < 256 * 2**20 else None,
    )  # fmt: skip
    for ours in bar:
        theirs, shape, read = found[ours]
        kind = ours.split(".")[-2]
        permute = keymap.interleaved_qk and kind in heads
        pk = _packed(ours, theirs, shape, weights, packed, config)
        if pk is not None:
            t, fmt = pk
            packs[ours] = (interleaved_to_half(t, heads[kind]) if permute else t, fmt)
            continue
        t = read()
        if permute:
            t = interleaved_to_half(t, heads[kind])
        if weights in FORMATS and _packable(ours, shape, config):
            packs[ours] = (quantize(t, weights), weights)
        else:
            sd[ours] = t.to(device=device, dtype=dtype)
    _place_packed(model, packs, config)
    if config.tie_embeddings and "output.weight" not in packs:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    placed = {k.rsplit(".", 1)[0] for k in packs} | {"output", "tok_embeddings"}
    assert not unexpected and all(k.rsplit(".", 1)[0] in placed for k in missing), (missing[:3], unexpected[:3])
    if config.tie_embeddings and "output.weight" not in packs:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_frequencies(config, device=device)  # a non-persistent buffer: computed, not loaded
    return model.eval()


def _packable(ours: str, shape: tuple[int, ...], config: Config) -> bool:
    """A linear weight (or the tied embedding, which is the output projection) with whole 32-blocks."""
    linear = _LINEAR.match(ours) or (ours == "tok_embeddings.weight" and config.tie_embeddings)
    return bool(linear) and len(shape) == 2 and shape[1] % 32 == 0


def _packed(ours: str, theirs: str, shape: tuple[int, ...], weights: str | None, packed: PackedReader | None,
            config: Config) -> tuple[torch.Tensor, str] | None:  # fmt: skip
    """The source's own packed tensor, when it has one and `weights` keeps packed tensors packed."""
    if weights in (None, *FLOAT_WEIGHTS) or packed is None or not _packable(ours, shape, config):
        return None
    return packed(theirs)


def _place_packed(model: LLaMA, packs: dict[str, tuple[torch.Tensor, str]], config: Config) -> None:
    """Swap the meta model's nn.Linear (and tied embedding) for packed modules holding `packs`."""
    if config.tie_embeddings and "tok_embeddings.weight" in packs:
        packs["output.weight"] = packs.pop("tok_embeddings.weight")
    for ours, (t, fmt) in packs.items():
        parent, _, child = ours.rsplit(".", 1)[0].rpartition(".")
        # 8 rows interleaved per block: the same bytes, read 1.2-2x faster by the kernels (a copy of the
        # file's tensor rather than a view of the mapped file)
        layout = "x8" if t.shape[0] % 8 == 0 else "gguf"
        packed = convert_layout(t.contiguous(), fmt, "gguf", layout)
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(packed, fmt, layout=layout))
    if config.tie_embeddings and "output.weight" in packs:
        model.tok_embeddings = QuantEmbedding.tied_to(model.output)
