"""Audio front end for the ImageBind-style bind network (v2.py): mp3 decoding, log-mel features and
a frozen pretrained audio encoder.

* Decoding: `miniaudio` (a self-contained wheel, needs `cffi`); nothing else that decodes mp3
  (torchaudio, soundfile, audioread, pydub, ffmpeg) is present in this environment.
* Encoder: the pip package `aisfx` (Ma & Lerch, ISMIR 2022, CC-BY 4.0) ships pretrained weights
  (`aisfx/models/checkpoint.pth`, 25 MB) of a 4-block CNN embedding net that load on CPU. Its own
  inference code pins librosa 0.9.2 / numpy 1.23, so we re-implement the (small) architecture and
  its librosa mel front end in torch and read only the checkpoint file from the installed package.
  The checkpoint is a pickle (weights + a dict of numpy ints): it is loaded with
  `weights_only=False`, so only load it from a package you installed yourself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 44100
N_FFT, HOP = 2048, 1024
N_MELS = 96
EMB_BLOCK, EMB_HOP = 100, 50  # frames per embedding (about 2.3 s) and hop, as aisfx's inference
EMBED_DIM = 512


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """mp3/flac/ogg/wav -> mono float32 waveform [N] at `sample_rate`."""
    try:
        import miniaudio
    except ImportError as e:
        raise RuntimeError("decoding audio needs the `miniaudio` package: pip install miniaudio") from e
    d = miniaudio.decode_file(str(path), output_format=miniaudio.SampleFormat.FLOAT32, nchannels=1,
                              sample_rate=sample_rate)  # fmt: skip
    return torch.frombuffer(bytearray(d.samples), dtype=torch.float32)


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


def log_mel(wave: torch.Tensor, sr: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP, n_mels: int = N_MELS):
    """aisfx's front end: peak-normalise, power mel spectrogram, log10(1e4 * S + 1) -> [frames, n_mels]."""
    peak = wave.abs().max()
    wave = wave / (peak if peak > 0 else 1)
    spec = torch.stft(wave, n_fft, hop, window=torch.hann_window(n_fft), center=True, return_complex=True)
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
        spec = log_mel(wave, sr)
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
        weights, _ = torch.load(checkpoint, map_location="cpu", weights_only=False)
        prefix = "embedding_net."
        sd = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        enc = cls()
        enc.load_state_dict(sd, strict=True)
        return enc.eval().requires_grad_(False)
