"""What one adapter takes besides text, and how each modality reaches it (ImageBind-LLM's idea: an
adapter trained on images alone takes anything bound to the image space).

Every input becomes a vector in the frozen image encoder's feature space (`features`):

    image   the image encoder's features
    video   the mean of its sampled frames' image features (video.py)
    audio   aisfx embedding -> `BindProjection` -> image space -> `EmbeddingSpace.inverse`
    points  `PointEncoder` -> image space -> `EmbeddingSpace.inverse`

and then takes the image's one path into the adapter (`adapter_inputs`): the visual projection gets
the features, a bind network gets them in the `EmbeddingSpace`. So image and video need only the
image encoder (any multimodal adapter takes both); audio and points need their bind networks and
the space's statistics, saved next to the adapter as `modalities.safetensors` and named in its
`adapter_config.json` ("modalities"). Their tensors live under `adapter_*` names, so the one
predicate `adapter.is_adapter_param` decides what is trained and what is saved here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter import ADAPTER_CONFIG, AdapterConfig, _atomic_write, is_adapter_param, mark_trainable
from .audio import EMBED_DIM, AisfxEncoder
from .bind import BindProjection, EmbeddingSpace
from .encoders import get_image_encoder
from .inputs import MODALITIES, Input
from .points import PointEncoder
from .video import VIDEO_FRAMES, embed_video, uniform_indices

MODALITY_FILE = "modalities.safetensors"
_AUDIO_ENCODER: list[AisfxEncoder] = []  # loaded once per process (chat loops, servers)


def audio_encoder() -> AisfxEncoder:
    """The frozen pretrained aisfx encoder, memoised."""
    if not _AUDIO_ENCODER:
        _AUDIO_ENCODER.append(AisfxEncoder.pretrained())
    return _AUDIO_ENCODER[0]


class SpaceStats(nn.Module):
    """An `EmbeddingSpace`'s statistics as buffers, so they travel (and save) with the module."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def space(self) -> EmbeddingSpace:
        return EmbeddingSpace(self.mean, self.std)


class ModalitySet(nn.Module):
    """The modalities of one adapter: its frozen image encoder (by name, loaded on first use), and
    where bound: the image space's statistics and the audio / point-cloud bind networks."""

    def __init__(
        self,
        image_encoder: str,
        feature_dim: int,
        *,
        tokens: bool = False,
        space: EmbeddingSpace | None = None,
        audio: BindProjection | None = None,
        points: PointEncoder | None = None,
        video_frames: int = VIDEO_FRAMES,
    ) -> None:
        super().__init__()
        self.image_encoder, self.feature_dim, self.tokens, self.video_frames = (
            image_encoder,
            feature_dim,
            tokens,
            video_frames,
        )
        if tokens and (audio is not None or points is not None):
            raise ValueError("audio and point clouds bind to global image features; a visual-query (token) adapter "
                             "takes images and video only")  # fmt: skip
        if (audio is not None or points is not None) and space is None:
            raise ValueError("audio and point-cloud bind networks need the image space they were bound to (space=)")
        self.adapter_space: SpaceStats | None = None
        if space is not None:
            self.adapter_space = SpaceStats(feature_dim)
            self.adapter_space.mean.copy_(space.mean)
            self.adapter_space.std.copy_(space.std)
        self.adapter_audio, self.adapter_points = audio, points
        mark_trainable(self)
        self.eval()

    @property
    def modalities(self) -> tuple[str, ...]:
        bound = {"audio": self.adapter_audio, "points": self.adapter_points}
        return tuple(m for m in MODALITIES if bound.get(m, True) is not None)

    def check(self, inp: Input | None, who: str = "this adapter") -> None:
        """ValueError when `inp` is a modality this set does not take, naming those it takes."""
        if inp is not None and inp.modality not in self.modalities:
            raise ValueError(
                f"{who} takes {', '.join(self.modalities)} (besides text), not {inp.modality}: it has no "
                f"{inp.modality} bind network; drop the {inp.modality} or use an adapter built for it"
            )

    def _device(self) -> torch.device:
        t = next(iter(self.parameters()), None) if self.adapter_space is None else self.adapter_space.mean
        return t.device if t is not None else torch.device("cpu")

    @torch.no_grad()
    def features(
        self, inputs: Sequence[Input | None], weights: str | os.PathLike[str] | None = None, device: Any = None
    ) -> torch.Tensor:
        """[B, feature_dim] image-encoder features per row (zeros for rows without an input), with
        the image encoder on `device` (default: where this set's tensors are). One encoder call for
        the batch's images; bound modalities land via the space."""
        for x in inputs:
            self.check(x)
        dev = torch.device(device) if device is not None else self._device()
        out = torch.zeros(len(inputs), self.feature_dim, device=dev)
        rows = {m: [i for i, x in enumerate(inputs) if x is not None and x.modality == m] for m in MODALITIES}
        if rows["image"] or rows["video"]:
            enc = get_image_encoder(self.image_encoder, weights, str(dev))
            if rows["image"]:
                ims = [inputs[i].data for i in rows["image"]]
                f = enc.embed_tokens(ims).flatten(1) if self.tokens else enc.embed(ims)
                out[rows["image"]] = f.to(dev, out.dtype)
            for i in rows[
                "video"
            ]:  # clips are read with VIDEO_FRAMES frames; an adapter recorded with fewer uses fewer
                frames = inputs[i].data
                frames = [frames[j] for j in uniform_indices(len(frames), self.video_frames)]
                out[i] = embed_video(enc, frames, self.tokens).to(dev, out.dtype)
        if rows["audio"]:
            enc = audio_encoder()
            emb = torch.stack([enc.embed_wave(inputs[i].data) for i in rows["audio"]])
            out[rows["audio"]] = self._bound(self.adapter_audio, emb).to(dev, out.dtype)
        if rows["points"]:
            clouds = self.adapter_points.prepare([inputs[i].data for i in rows["points"]])
            out[rows["points"]] = self._bound(self.adapter_points, clouds).to(dev, out.dtype)
        if out.shape[1] != self.feature_dim:
            raise ValueError(f"encoder {self.image_encoder} gave {out.shape[1]} features, expected {self.feature_dim}")
        return out

    def _bound(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A bind network's point of the space, as image-encoder features."""
        return self.adapter_space.space().inverse(net(x.to(self._device())))

    def adapter_inputs(
        self,
        inputs: Sequence[Input | None],
        config: AdapterConfig,
        weights: str | os.PathLike[str] | None = None,
        device: Any = None,
    ) -> dict[str, torch.Tensor]:
        """`AdaptedLLaMA.prompt_state` keywords for a batch: `visual` (the visual projection's input)
        and/or `bind` (the bind network's, in the space), and `has_image` (rows with any input)."""
        feats = self.features(inputs, weights, device)
        kw = {"has_image": torch.tensor([x is not None for x in inputs], device=feats.device)}
        if config.visual_dim:
            kw["visual"] = feats
        if config.bind_dim:
            if self.adapter_space is None:
                raise ValueError("this adapter's bind network needs its image space statistics, which it lacks; "
                                 "save them with ModalitySet(space=...).save(adapter_dir)")  # fmt: skip
            kw["bind"] = self.adapter_space.space()(feats)
        return kw

    # -- files -----------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """What rebuilds this set: recorded as "modalities" in the adapter's adapter_config.json."""
        m: dict[str, Any] = {
            "takes": list(self.modalities), "image_encoder": self.image_encoder, "feature_dim": self.feature_dim,
            "tokens": self.tokens, "video": {"frames": self.video_frames, "pool": "mean"},
        }  # fmt: skip
        if self.adapter_space is not None:
            m["file"] = MODALITY_FILE
        if self.adapter_audio is not None:
            m["audio"] = {"encoder": AisfxEncoder.cache_id, "in_dim": EMBED_DIM,
                          "hidden": self.adapter_audio.net[0].out_features}  # fmt: skip
        if self.adapter_points is not None:
            m["points"] = {"encoder": "pointnet", **self.adapter_points.config()}
        return m

    def save(self, adapter_dir: str | os.PathLike[str]) -> Path:
        """Write `modalities.safetensors` (when there is anything bound) into an adapter directory
        and record `meta()` in its adapter_config.json."""
        d = Path(adapter_dir)
        cfg_path = d / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise ValueError(f"{d} is not an adapter directory ({ADAPTER_CONFIG} is missing); save the adapter first")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if is_adapter_param(k)}
        if tensors:
            _atomic_write(d / MODALITY_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        meta = json.loads(cfg_path.read_text())
        meta["modalities"] = self.meta()
        _atomic_write(cfg_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))
        return d

    @classmethod
    def for_adapter(
        cls,
        config: AdapterConfig,
        meta: dict[str, Any] | None = None,
        adapter_dir: str | os.PathLike[str] | None = None,
    ) -> ModalitySet | None:
        """The set an adapter records (adapter_config.json "modalities"), else what its config
        implies: a visual adapter with an image encoder takes images and video; None = text only."""
        rec = (meta or {}).get("modalities")
        if not rec:
            if not (config.visual_dim and config.image_encoder):
                return None
            return cls(config.image_encoder, config.visual_dim, tokens=bool(config.visual_query_blocks))
        if not isinstance(rec, dict) or not isinstance(rec.get("image_encoder"), str):
            raise ValueError(f"{adapter_dir}: the 'modalities' entry of {ADAPTER_CONFIG} is damaged")
        dim = int(rec.get("feature_dim", 0))
        space = EmbeddingSpace(torch.zeros(dim), torch.ones(dim)) if rec.get("file") else None
        audio = BindProjection(EMBED_DIM, dim, rec["audio"]["hidden"]) if "audio" in rec else None
        pts = rec.get("points")
        points = PointEncoder(dim, tuple(pts["widths"]), pts["hidden"], points=pts["points"]) if pts else None
        out = cls(rec["image_encoder"], dim, tokens=bool(rec.get("tokens")), space=space, audio=audio, points=points,
                  video_frames=int((rec.get("video") or {}).get("frames", VIDEO_FRAMES)))  # fmt: skip
        if rec.get("file"):
            out._load(Path(adapter_dir or ".") / rec["file"])
        return out

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: the adapter's audio/point-cloud bind networks; copy it with the adapter"
            )
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is damaged ({e}); re-save the adapter's modalities") from e
        want = {k for k in self.state_dict() if is_adapter_param(k)}
        if set(sd) != want:
            raise ValueError(f"{path} holds {sorted(set(sd) ^ want)[:3]}... that its adapter_config.json does not "
                             "describe; was it saved by another version?")  # fmt: skip
        try:
            self.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: {' '.join(str(e).split())[:300]}") from e
