"""Binding another modality to the image space (multimodal/bind.py, ImageBind-style)."""

import math

import pytest
import torch
from safetensors.torch import save

from llama_adapter.multimodal.bind import EmbeddingSpace, cache_enhance, recall_at_k, to_sphere, train_bind_projection

pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedding_space_on_sphere_and_centred():
    torch.manual_seed(0)
    feats = torch.rand(200, 16) * torch.linspace(0.1, 10, 16) + 5  # positive, scales differ by dimension
    space = EmbeddingSpace.fit(feats)
    z = space(feats)
    torch.testing.assert_close(z.norm(dim=-1), torch.full((200,), math.sqrt(16)))
    # Raw features all point the same way; in the space, random pairs are about orthogonal.
    raw_cos = torch.nn.functional.cosine_similarity(feats[:100], feats[100:]).mean()
    cos = torch.nn.functional.cosine_similarity(z[:100], z[100:]).mean()
    assert raw_cos > 0.9 and abs(cos) < 0.15


def test_recall_at_k_counts_ranks():
    keys = torch.eye(10)
    assert recall_at_k(keys, keys) == {1: 1.0, 5: 1.0}
    # Half the queries point at the next row's key: their own key is not first, and every
    # other key scores 0 as their own does (ties do not count against them), so they fall
    # outside top-1 only.
    q = keys.clone()
    q[:5] = keys[torch.arange(1, 6)] + 0.5 * keys[:5]
    r = recall_at_k(q, keys, ks=(1, 2))
    assert r == {1: 0.5, 2: 1.0}


def test_bind_projection_learns_a_hidden_pairing():
    # Image embedding = a fixed random nonlinear function of the audio embedding + noise; a
    # projection trained on 300 pairs must retrieve held-out pairs far above chance (1/100).
    torch.manual_seed(0)
    n_train, n_val, da, di = 300, 100, 24, 48
    audio = torch.randn(n_train + n_val, da)
    image = to_sphere(torch.tanh(audio @ torch.randn(da, di)) + 0.3 * torch.randn(n_train + n_val, di))
    proj, losses = train_bind_projection(audio[:n_train], image[:n_train], steps=150, batch_size=128, hidden=64)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        mapped = proj(audio[n_train:])
    torch.testing.assert_close(mapped.norm(dim=-1), torch.full((n_val,), math.sqrt(di)))
    r = recall_at_k(mapped, image[n_train:])
    assert r[1] > 0.3 and r[5] > 0.6
    # The same pairs with the images shuffled: nothing to learn, held-out recall stays near chance.
    perm = torch.randperm(n_train)
    shuffled, _ = train_bind_projection(audio[:n_train], image[:n_train][perm], steps=150, batch_size=128, hidden=64)
    with torch.no_grad():
        assert recall_at_k(shuffled(audio[n_train:]), image[n_train:])[5] < 0.2


def test_bind_projection_same_seed_same_weights():
    # examples/imagebind_audio.py once trained different bind adapters from the same seed; the bind
    # projection must depend on its seed alone: not on the global RNG, which it leaves untouched.
    torch.manual_seed(1)
    a, b = torch.randn(40, 8), to_sphere(torch.randn(40, 12))
    runs = []
    for global_seed in (5, 6):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        proj, losses = train_bind_projection(a, b, steps=5, hidden=16, seed=3)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((save(proj.state_dict()), losses))
    assert runs[0] == runs[1]  # byte-identical weights, identical losses
    other, _ = train_bind_projection(a, b, steps=5, hidden=16, seed=4)
    assert save(other.state_dict()) != runs[0][0]


def test_cache_enhance_moves_toward_cached_images():
    torch.manual_seed(0)
    cache = to_sphere(torch.randn(50, 32))
    q = to_sphere(cache[7] + 0.8 * torch.randn(32))[None]
    torch.testing.assert_close(cache_enhance(q, cache, alpha=1.0), q)  # alpha 1: the query untouched
    only = cache_enhance(q, cache, k=1, alpha=0.0)  # alpha 0, k 1: its nearest cached image
    nearest = int((q @ cache.T).argmax())
    torch.testing.assert_close(only, cache[nearest][None])
    mixed = cache_enhance(q, cache)
    torch.testing.assert_close(mixed.norm(dim=-1), q.norm(dim=-1))
    cos = torch.nn.functional.cosine_similarity
    assert cos(mixed, cache[nearest][None]) > cos(q, cache[nearest][None])
