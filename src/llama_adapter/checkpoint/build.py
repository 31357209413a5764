"""Turn a format's tensor index into a model: check every name and shape, then convert and assign.

The model is built on the meta device, every tensor name and shape is checked against it (the first
mismatch is an error naming the tensor), then tensors are converted one by one to the requested
dtype/device and assigned, so weights are never allocated twice.
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
from .common import ModelSource
from .keymaps import KeyMap, interleaved_to_half

# One tensor of a checkpoint, not read yet: (their name, shape in torch order, reader).
Lazy = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]
_LAYER = re.compile(r"^layers\.(\d+)\.")


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
) -> LLaMA:
    """A checked, loaded model (eval mode) from a format's tensor index and key table."""
    model = _meta_model(config, keymap, tensors)
    found = _check(source, config, keymap, tensors, model)
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    total = sum(math.prod(shape) for _, shape, _ in found.values()) * torch.empty((), dtype=dtype).element_size()
    sd: dict[str, torch.Tensor] = {}
    bar = tqdm(
        found, desc=f"loading {source.name}", unit="tensor", file=sys.stderr, leave=False,
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
