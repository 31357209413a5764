import importlib.util
import math

import pytest
import torch
from helpers import FLICKR

from llama_adapter.multimodal.audio import (
    EMBED_DIM,
    AisfxEncoder,
    decode_audio,
    embed_audio_files,
    log_mel,
    mel_filterbank,
    resample,
)

AUDIO = str(FLICKR / "audio")
MP3 = f"{AUDIO}/1000268201_693b08cb0e.mp3"
MP3_B = f"{AUDIO}/1001773457_577c3a7d70.mp3"
HAS_AISFX = importlib.util.find_spec("aisfx") is not None
HAS_MINIAUDIO = importlib.util.find_spec("miniaudio") is not None
needs_aisfx = pytest.mark.skipif(not HAS_AISFX, reason="needs `pip install --no-deps aisfx` (pretrained weights)")
needs_decoder = pytest.mark.skipif(not HAS_MINIAUDIO, reason="needs `pip install miniaudio cffi` (mp3 decoder)")


def test_mel_filterbank_and_sine_peak():
    fb = mel_filterbank(44100, 2048, 96)
    assert fb.shape == (96, 1025)
    torch.testing.assert_close(fb.sum(1), torch.ones(96))
    t = torch.arange(44100) / 44100
    spec = log_mel(torch.sin(2 * math.pi * 1000 * t))
    assert spec.shape == (1 + 44100 // 1024, 96)
    # HTK mel(1000 Hz) = 1000; 96 bands between mel 0 and mel(22050) ~ 3923 put it at ~band 24
    assert abs(int(spec.mean(0).argmax()) - 24) <= 1


def test_resample_is_band_limited():
    # 24 kHz -> 44.1 kHz (the Flickr mp3s' rate -> aisfx's): a 1 kHz sine stays that sine.
    # A whole number of periods, so the FFT's periodic assumption holds exactly.
    n = 24000
    # (phases in float64: float32 sin of arguments near 6000 is itself off by ~5e-4)
    x = torch.sin(2 * math.pi * 1000 * torch.arange(n, dtype=torch.float64) / 24000).float()
    y = resample(x, 24000, 44100)
    assert y.numel() == 44100
    ref = torch.sin(2 * math.pi * 1000 * torch.arange(44100, dtype=torch.float64) / 44100).float()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    assert resample(x, 24000, 24000) is x


def test_encoder_shape_random_init():
    enc = AisfxEncoder().eval()
    with torch.no_grad():
        e = enc.embed_wave(torch.randn(44100 * 3) * 0.1)
    assert e.shape == (EMBED_DIM,)


@needs_aisfx
def test_encoder_matches_aisfx_own_code():
    # aisfx's network, normalisation and blocking import without its pinned librosa: run its own
    # pipeline from our spectrogram and compare with embed_wave (catches a missing
    # normalisation, a transposed layout or different block counts, not just the conv weights).
    import aisfx.inference as ai
    from aisfx.preprocessing import spectrogram_normalize

    enc = AisfxEncoder.pretrained()
    from llama_adapter.multimodal.audio import _numpy_safe_globals

    with torch.serialization.safe_globals(_numpy_safe_globals()):
        weights, ds = torch.load(ai.get_path_modelWeights(), map_location="cpu", weights_only=True)
    ref = ai.load_bestModel(weights, ds, "cpu")
    torch.manual_seed(0)
    t = torch.arange(44100 * 3) / 44100
    for wave in (torch.sin(2 * math.pi * 440 * t) * torch.linspace(0, 1, t.numel()), torch.randn(t.numel() // 2)):
        spec = log_mel(wave).numpy()
        theirs = ai.model_get_embedding(spectrogram_normalize(spec, "original"), 0.5, True, ref, "cpu").mean(0)
        torch.testing.assert_close(enc.embed_wave(wave), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("librosa") is None or not (HAS_AISFX and HAS_MINIAUDIO),
                    reason="librosa (aisfx's front end) not installed")  # fmt: skip
def test_log_mel_matches_librosa():
    import librosa

    wave = decode_audio(MP3)
    y = (wave / wave.abs().max()).numpy()
    ref = librosa.feature.melspectrogram(y=y, sr=44100.0, n_mels=96, norm=1.0, fmin=0.0, fmax=22050.0, htk=True,
                                         power=2.0, hop_length=1024, win_length=2048)  # fmt: skip
    ref = torch.from_numpy(ref * 1e4 + 1).log10().T.float()
    torch.testing.assert_close(log_mel(wave), ref, atol=2e-4, rtol=1e-4)


@needs_aisfx
@needs_decoder
def test_pretrained_aisfx_on_flickr_audio():
    enc = AisfxEncoder.pretrained()
    wave = decode_audio(MP3)
    assert wave.ndim == 1 and wave.numel() > 44100
    e = enc.embed_wave(wave)
    assert e.shape == (EMBED_DIM,) and torch.isfinite(e).all()
    torch.testing.assert_close(enc.embed_wave(decode_audio(MP3)), e, atol=0, rtol=0)  # deterministic
    other = enc.embed_wave(decode_audio(MP3_B))
    assert torch.cosine_similarity(e, other, 0) < 0.999  # two spoken captions do not collapse


@needs_decoder
def test_embed_audio_files_caches(tmp_path):
    torch.manual_seed(0)
    enc = AisfxEncoder().eval()  # random weights: the cache, not the weights, is under test
    first = embed_audio_files([MP3, MP3_B], tmp_path, encoder=enc, progress=False)
    assert first.shape == (2, EMBED_DIM) and not torch.equal(first[0], first[1])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2

    class Boom(AisfxEncoder):
        def embed_wave(self, *a, **k):
            raise AssertionError("the cache should have answered")

    again = embed_audio_files([MP3_B, MP3], tmp_path, encoder=Boom(), progress=False)
    torch.testing.assert_close(again, first.flip(0), atol=0, rtol=0)


@needs_aisfx
@needs_decoder
def test_audio_cache_hit_or_miss_leaves_the_same_random_state(tmp_path):
    # The cause of two same-seed runs of examples/imagebind_audio.py training different adapters:
    # only a cache miss built the aisfx network, whose random init advanced the global RNG, so the
    # adapter built next was initialised differently on a cold and on a warm cache.
    states = []
    for _ in ("miss", "hit"):
        torch.manual_seed(0)
        embed_audio_files([MP3], tmp_path, progress=False)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    torch.manual_seed(0)
    assert torch.equal(torch.get_rng_state(), states[0])  # and extraction draws nothing at all


def test_decode_errors_name_the_file(tmp_path):
    if not HAS_MINIAUDIO:
        pytest.skip("needs miniaudio")
    bad = tmp_path / "x.mp3"
    bad.write_bytes(b"not audio at all" * 10)
    with pytest.raises(ValueError, match="x.mp3"):
        decode_audio(bad)
