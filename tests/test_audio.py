import importlib.util
import math

import pytest
import torch

from llama_adapter.audio import EMBED_DIM, AisfxEncoder, decode_audio, log_mel, mel_filterbank

MP3 = "/work/shared/data/flickr8k_1k/audio/1000268201_693b08cb0e.mp3"


def test_mel_filterbank_and_sine_peak():
    fb = mel_filterbank(44100, 2048, 96)
    assert fb.shape == (96, 1025)
    torch.testing.assert_close(fb.sum(1), torch.ones(96))
    t = torch.arange(44100) / 44100
    spec = log_mel(torch.sin(2 * math.pi * 1000 * t))
    assert spec.shape == (1 + 44100 // 1024, 96)
    # HTK mel(1000 Hz) = 1000; 96 bands between mel 0 and mel(22050) ~ 3923 put it at ~band 24
    assert abs(int(spec.mean(0).argmax()) - 24) <= 1


def test_encoder_shape_random_init():
    enc = AisfxEncoder().eval()
    with torch.no_grad():
        e = enc.embed_wave(torch.randn(44100 * 3) * 0.1)
    assert e.shape == (EMBED_DIM,)


@pytest.mark.skipif(
    importlib.util.find_spec("aisfx") is None or importlib.util.find_spec("miniaudio") is None,
    reason="needs `pip install --no-deps aisfx miniaudio` (pretrained weights + mp3 decoder)",
)
def test_pretrained_aisfx_on_flickr_audio():
    enc = AisfxEncoder.pretrained()
    wave = decode_audio(MP3)
    assert wave.ndim == 1 and wave.numel() > 44100
    e = enc.embed_wave(wave)
    assert e.shape == (EMBED_DIM,) and torch.isfinite(e).all()
