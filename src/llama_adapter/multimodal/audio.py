"""Audio, bound to the image space as ImageBind does: mp3 decoding, log-mel features and a frozen
pretrained audio encoder (an `embeddings.Embedder`; bind.py maps its embeddings to images).

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
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import embed_files

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
        import miniaudio  # optional (pip install llama-adapter[audio]): only audio needs it
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
    blocks [B, frames, 96] -> [B, 512]; `embed_wave` mean-pools the block embeddings of a clip,
    `embed` does it for a batch of audio files (the `embeddings.Embedder` interface)."""

    name = "aisfx"
    cache_id = "aisfx-v1"  # bump when the front end or pooling changes, so old cached embeddings are not reused
    feature_dim = EMBED_DIM

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

    def embed(self, paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
        """Audio files -> clip embeddings [len(paths), 512]."""
        if not paths:
            return torch.zeros(0, EMBED_DIM)
        return torch.stack([self.embed_wave(decode_audio(p)) for p in paths])

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
        # Built without advancing the global RNG: the random init is overwritten just below, and a run
        # that builds the encoder (audio-cache miss) and one that does not (hit) must draw the same
        # random numbers afterwards. They did not, and two runs of examples/imagebind_audio.py with
        # the same seed initialised their adapters differently.
        with torch.random.fork_rng(devices=[]):
            enc = cls()
        enc.load_state_dict(sd, strict=True)
        return enc.eval().requires_grad_(False)


def _numpy_safe_globals() -> list:
    """What aisfx's pickle needs beyond tensors: numpy int scalars (a dataset-id dict) and their dtype."""
    try:  # numpy 2 moved numpy.core to numpy._core; the pickle still names the old path
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    out: list = [(scalar, "numpy.core.multiarray.scalar"), np.dtype]
    if hasattr(np, "dtypes"):
        out.append(np.dtypes.Int64DType)
    return out


def embed_audio_files(
    paths: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None = None,
    encoder: AisfxEncoder | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Clip embeddings [len(paths), 512] from the pretrained aisfx encoder (or `encoder`). With
    `cache_dir`, each file's embedding is kept under `<cache_dir>/aisfx-v1/` by the file's sha256, so
    re-runs (and renamed copies) skip decoding and the CNN."""
    enc = encoder if encoder is not None else AisfxEncoder.pretrained()
    return embed_files(enc, paths, cache_dir, batch_size=1, progress=progress)
