"""Files behind the frozen encoders: reading a weights file in the formats encoders ship in, checking it
against the architecture, and the sha256 that names a file in weight identities and embedding caches."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex), read in chunks so large weights files do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """.safetensors, .pt/.pth/.bin (torch.load, weights only) or an OpenAI TorchScript archive."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file {p} not found")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            is_script = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
        if is_script:  # OpenAI's released CLIP .pt files are TorchScript modules
            try:
                return torch.jit.load(str(p), map_location="cpu").state_dict()
            except Exception as e:
                raise ValueError(f"{p} looks like a TorchScript archive but did not load ({e})") from e
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{p} is not a loadable weights file ({type(e).__name__}: {e}); "
            "use .safetensors, a torch state dict (.pt/.pth/.bin) or an OpenAI CLIP .pt"
        ) from e
    if not isinstance(sd, dict):
        raise ValueError(f"{p} holds a {type(sd).__name__}, not a state dict")
    return sd


def check_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Every expected key present with the right shape and nothing extra; names the first mismatch.
    BatchNorm's `num_batches_tracked` counters are ignored on both sides (eval-only encoders)."""
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(
                f"{where}: missing tensor {k!r}; the weights do not match the {type(module).__name__} "
                "architecture (wrong encoder name or checkpoint?)"
            )
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: {k} has shape {list(sd[k].shape)}, the encoder expects {list(v.shape)}; "
                "the weights are for a different architecture (e.g. ViT-L/14 vs ViT-B/16)"
            )
    extra = [k for k in sorted(set(sd) - set(expected)) if not k.endswith("num_batches_tracked")]
    if extra:
        raise ValueError(
            f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
            "the weights are for a different architecture"
        )
