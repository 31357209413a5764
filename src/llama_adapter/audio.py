"""Audio front end for the ImageBind-style bind network (v2.py): mp3 decoding, log-mel features and
a frozen pretrained audio encoder.

* Decoding: `miniaudio` (a self-contained wheel, needs `cffi`); nothing else that decodes mp3
  (torchaudio, soundfile, audioread, pydub, ffmpeg) is present in this environment.
* Encoder: the pip package `aisfx` (Ma & Lerch, ISMIR 2022, CC-BY 4.0) ships pretrained weights
  (`aisfx/models/checkpoint.pth`, 25 MB) of a 4-block CNN embedding net that load on CPU. Its own
  inference code pins librosa 0.9.2 / numpy 1.23, so we re-implement the (small) architecture and
  its librosa mel front end in torch and read only the checkpoint file from the installed package.
  The checkpoint is a pickle (weights + a dict of numpy ints); it loads with `weights_only=True`
  and only the numpy scalar/dtype globals allowed, so no arbitrary code can run from it.
  Checked against aisfx's own code (CrossNet.get_embedding, spectrogram_normalize, blocking) with
  librosa 0.11 in a scratch directory: same spectrogram to 5e-5 and embedding to 6e-6 on the same
  waveform; with aisfx's `librosa.load` decoding as well, 0.1-0.2% relative difference.
* Binding (ImageBind, arXiv 2305.05665): `EmbeddingSpace` fixes a unit-norm image space,
  `AudioToImage` maps frozen audio embeddings into it, trained with `train_bind_projection`
  (symmetric InfoNCE against the frozen image side); `recall_at_k` measures it and
  `cache_enhance` is ImageBind-LLM's training-free visual cache model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 44100
N_FFT, HOP = 2048, 1024
N_MELS = 96
EMB_BLOCK, EMB_HOP = 100, 50  # frames per embedding (about 2.3 s) and hop, as aisfx's inference
EMBED_DIM = 512
# aisfx's `spectrogram_normalize(spec_norm="original")`: min 0 / max over all of the paper's training
# spectrograms. The network's first conv has no bias and its BatchNorm runs on fixed statistics, so
# leaving this out changes every embedding, not just their scale.
SPEC_MAX = 9.457798957824707


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """mp3/flac/ogg/wav -> mono float32 waveform [N] at `sample_rate`.

    Decoded at the file's own rate, then resampled with `resample` (band-limited): miniaudio's own
    resampler leaks images of the 0-12 kHz band of a 24 kHz mp3 into 12-22 kHz, which aisfx's
    log10(1e4 * S + 1) compression makes loud (embeddings 17-19% off the aisfx/librosa pipeline
    vs 0.2% this way).
    """
    try:
        import miniaudio
    except ImportError as e:
        raise RuntimeError("decoding audio needs the `miniaudio` package: pip install miniaudio cffi") from e
    path = str(path)
    try:
        sr = miniaudio.get_file_info(path).sample_rate
        d = miniaudio.decode_file(path, output_format=miniaudio.SampleFormat.FLOAT32, nchannels=1, sample_rate=sr)
    except miniaudio.DecodeError as e:
        raise ValueError(f"{path}: not a decodable audio file (mp3, flac, ogg/vorbis or wav): {e}") from e
    wave = torch.frombuffer(bytearray(d.samples), dtype=torch.float32)
    return resample(wave, sr, sample_rate)


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Ideal band-limited resampling through the FFT (the spectrum is zero-padded or cut), close
    to librosa's default soxr_hq; output length ceil(N * new / orig) as librosa's."""
    if orig_sr == new_sr or wave.numel() == 0:
        return wave
    n = wave.numel()
    m = -(-n * new_sr // orig_sr)
    spec = torch.fft.rfft(wave.double())
    return (torch.fft.irfft(spec, n=m) * (m / n)).float()


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """HTK-scale triangular filters [n_mels, n_fft//2+1], each normalised to unit L1 norm
    (librosa.filters.mel(htk=True, norm=1.0))."""
    fmax = fmax or sr / 2

    def hz_to_mel(f: float | torch.Tensor):
        return 2595.0 * (torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0))

    mels = torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    fdiff = hz.diff()
    ramps = hz[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = torch.clamp(torch.minimum(lower, upper), min=0)
    w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
    return w.float()


def log_mel(
    wave: torch.Tensor, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP, n_mels: int = N_MELS
) -> torch.Tensor:
    """aisfx's librosa front end: peak-normalise, power mel spectrogram, log10(1e4 * S + 1) -> [frames, n_mels].

    Frames are centred with zero padding: librosa >= 0.9 (aisfx pins 0.9.2) pads with zeros by
    default, and so does Essentia's FrameCutter that the paper used (torch's default is reflect).
    """
    peak = wave.abs().max()
    wave = wave / (peak if peak > 0 else 1)
    spec = torch.stft(
        wave, n_fft, hop, window=torch.hann_window(n_fft), center=True, pad_mode="constant", return_complex=True
    )
    power = spec.abs().pow(2)  # [n_fft//2+1, frames]
    mel = mel_filterbank(sr, n_fft, n_mels) @ power
    return torch.log10(mel * 10000.0 + 1).T.contiguous()


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, pool)


class AisfxEncoder(nn.Module):
    """aisfx's embedding net (DCASE cross-task CNN, 4 conv blocks 64..512, max pooling): log-mel
    blocks [B, frames, 96] -> [B, 512]; `embed_wave` mean-pools the block embeddings of a clip."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = [1, width, 2 * width, 4 * width, 8 * width]
        self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4 = (
            _ConvBlock(w[i], w[i + 1]) for i in range(4)
        )

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        x = spec[:, None]
        x = self.conv_block1(x, 2)
        x = self.conv_block2(x, 2)
        x = self.conv_block3(x, 2)
        x = self.conv_block4(x, 1)
        return x.mean(dim=3).amax(dim=2)

    @torch.no_grad()
    def embed_wave(self, wave: torch.Tensor, sr: int = SAMPLE_RATE) -> torch.Tensor:
        """One clip -> [512]: aisfx's blocks (100 frames, hop 50, a trailing partial block dropped,
        a clip shorter than one block zero-padded), embedded, then averaged into one vector."""
        spec = log_mel(wave, sr) / SPEC_MAX
        if spec.shape[0] < EMB_BLOCK:
            spec = F.pad(spec, (0, 0, 0, EMB_BLOCK - spec.shape[0]))
        n = 1 + (spec.shape[0] - EMB_BLOCK) // EMB_HOP
        blocks = torch.stack([spec[i * EMB_HOP : i * EMB_HOP + EMB_BLOCK] for i in range(n)])
        return self(blocks).mean(0)

    @classmethod
    def pretrained(cls, checkpoint: str | Path | None = None) -> AisfxEncoder:
        """Frozen encoder with the weights shipped in the installed `aisfx` package (CPU)."""
        if checkpoint is None:
            spec = importlib.util.find_spec("aisfx")  # locates the package without importing it
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("the pretrained audio encoder needs `pip install --no-deps aisfx`")
            checkpoint = Path(next(iter(spec.submodule_search_locations))) / "models" / "checkpoint.pth"
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            weights, _ = torch.load(checkpoint, map_location="cpu", weights_only=True)
        prefix = "embedding_net."
        sd = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        enc = cls()
        enc.load_state_dict(sd, strict=True)
        return enc.eval().requires_grad_(False)


def _numpy_safe_globals() -> list:
    """What aisfx's pickle needs beyond tensors: numpy int scalars (a dataset-id dict) and their dtype."""
    import numpy as np

    try:  # numpy 2 moved numpy.core to numpy._core; the pickle still names the old path
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    out: list = [(scalar, "numpy.core.multiarray.scalar"), np.dtype]
    if hasattr(np, "dtypes"):
        out.append(np.dtypes.Int64DType)
    return out


# ------------------------------------------------------------------------------------------------ cached extraction
CACHE_ID = "aisfx-v1"  # bump when the front end or pooling changes, so old cached embeddings are not reused


def embed_audio_files(
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    encoder: AisfxEncoder | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Clip embeddings [len(paths), 512] from the pretrained aisfx encoder. With `cache_dir`, each
    file's embedding is kept as `<cache_dir>/aisfx-v1/<sha256 of the file>.pt`, so re-runs (and
    renamed copies) skip decoding and the CNN."""
    root = Path(cache_dir) / CACHE_ID if cache_dir is not None else None
    out: list[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="embedding audio (aisfx)", file=sys.stderr, dynamic_ncols=True)
    for p in paths:
        f = None
        if root is not None:
            f = root / f"{hashlib.sha256(Path(p).read_bytes()).hexdigest()}.pt"
            if f.is_file():
                out.append(torch.load(f, weights_only=True))
                if bar:
                    bar.update(1)
                continue
        if encoder is None:
            encoder = AisfxEncoder.pretrained()
        e = encoder.embed_wave(decode_audio(p)).contiguous()
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp")
            torch.save(e, tmp)
            tmp.replace(f)  # atomic: a killed run never leaves a half-written embedding behind
        out.append(e)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return torch.stack(out) if out else torch.zeros(0, EMBED_DIM)


# ------------------------------------------------------------------------------------------------ binding
@dataclass
class EmbeddingSpace:
    """The shared space every modality is bound to (ImageBind normalises its embeddings): features
    are z-scored per dimension with the *training images'* statistics (EfficientNet's multi-scale
    features differ in scale by stage and are all positive, so raw cosines are all close to 1),
    then put on the sphere of radius sqrt(d), i.e. RMS 1 per element, a scale the bind network's
    first linear layer handles well."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, feats: torch.Tensor) -> EmbeddingSpace:
        return cls(feats.mean(0), feats.std(0).clamp(min=1e-6))

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return to_sphere((feats - self.mean) / self.std)


def to_sphere(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm sqrt(d) (RMS 1 per element)."""
    return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])


class AudioToImage(nn.Module):
    """Frozen audio embedding [B, in_dim] -> a point in the image `EmbeddingSpace` [B, out_dim]:
    z-score (statistics stored as buffers, set from the training clips), a 2-layer MLP, projection
    onto the sphere. Only this trains; the aisfx encoder stays frozen (ImageBind trains the whole
    audio encoder, which 900 pairs cannot support)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        # CLIP/ImageBind's learnable temperature, starting at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return to_sphere(self.net((audio - self.in_mean) / self.in_std))


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs (row i of `a` belongs with row i of `b`), cosine
    similarities times exp(logit_scale)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * logit_scale.exp().clamp(max=100)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_bind_projection(
    audio: torch.Tensor,
    image: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    hidden: int = 512,
    dropout: float = 0.1,
    seed: int = 0,
) -> tuple[AudioToImage, list[float]]:
    """Bind audio to the image space as ImageBind does: the image side is frozen (`image` already
    in the `EmbeddingSpace`), an `AudioToImage` is trained on the pairs (audio[i], image[i]) with
    symmetric InfoNCE, in-batch negatives. Returns the projection (eval mode) and the step losses."""
    if audio.shape[0] != image.shape[0] or audio.shape[0] < 2:
        raise ValueError(f"need >= 2 aligned pairs, got {audio.shape[0]} audio and {image.shape[0]} image rows")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the MLP's init and dropout masks: same seed, same projection
        proj = AudioToImage(audio.shape[1], image.shape[1], hidden, dropout)
        proj.in_mean.copy_(audio.mean(0))
        proj.in_std.copy_(audio.std(0).clamp(min=1e-6))
        opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        n = audio.shape[0]
        bs = min(batch_size, n)
        proj.train()
        for step in range(steps):
            idx = torch.randperm(n, generator=g)[:bs]
            loss = info_nce(proj(audio[idx]), image[idx], proj.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:  # cosine decay: the last steps settle instead of jumping
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.step()
            losses.append(loss.item())
    return proj.eval(), losses


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries whose own key (same row) is among the k most cosine-similar keys."""
    sim = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(1)  # keys strictly closer than the right one
    return {k: float((rank < k).float().mean()) for k in ks}


def cache_enhance(
    query: torch.Tensor, cache: torch.Tensor, k: int = 5, temperature: float = 100.0, alpha: float = 0.5
) -> torch.Tensor:
    """ImageBind-LLM's training-free visual cache model (official code: top 5, softmax of
    100 * cosine, alpha 0.5): mix each query with the similarity-weighted mean of its k nearest
    *image* embeddings from a cache (here the training images), pulling another modality's
    embedding toward where real images lie. Rows come back on the query's sphere."""
    q = F.normalize(query, dim=-1)
    c = F.normalize(cache, dim=-1)
    sims, idx = (q @ c.T).topk(min(k, c.shape[0]), dim=-1)
    w = (sims * temperature).softmax(-1)
    proto = F.normalize((w[..., None] * c[idx]).sum(-2), dim=-1)
    mixed = F.normalize(alpha * q + (1 - alpha) * proto, dim=-1)
    return mixed * query.norm(dim=-1, keepdim=True)
