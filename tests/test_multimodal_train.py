"""Multimodal finetune end to end on stories260K + a few Flickr images + the real EfficientNet-Lite0."""

import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED, STORIES, tiny_run

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import main
from llama_adapter.multimodal import example_features, load_image_encoder
from llama_adapter.train import TrainArgs, finetune

IMAGES = SHARED / "flickr8k_1k" / "images"

pytestmark = pytest.mark.skipif(not (STORIES.exists() and IMAGES.is_dir()), reason="shared data missing")


def image_data(tmp_path: Path) -> tuple[Path, list[Path]]:
    images = sorted(IMAGES.glob("*.jpg"))[:4]
    words = ["dog", "girl", "boat", "ball"]
    rows = [
        {"image": str(p), "instruction": "Describe the image.", "output": f"A {w} is in the park."}
        for p, w in zip(images, words)
    ] * 4
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, images


def test_zero_init_equal_with_and_without_image():
    enc = load_image_encoder("efficientnet-lite0")
    base = load_model(STORIES)
    torch.manual_seed(0)
    model = AdaptedLLaMA(
        base,
        AdapterConfig(adapter_len=4, adapter_layers=5, visual_dim=enc.feature_dim, image_encoder="efficientnet-lite0"),
    ).eval()
    feats, has = example_features([{"image": str(sorted(IMAGES.glob("*.jpg"))[0])}], enc)
    idx = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        ref = base(idx)
        text = model(idx)
        img = model(idx, ctx=model.prompt_state(visual=feats, has_image=has))
    assert torch.allclose(ref, text, atol=1e-5) and torch.allclose(ref, img, atol=1e-5)


def test_finetune_with_images_then_generate(tmp_path, capsys):
    data, images = image_data(tmp_path)
    out = tmp_path / "run"
    encoder = dict(image_encoder="efficientnet-lite0", feature_cache=str(tmp_path / "cache"))
    run = dict(epochs=6, val_data=str(data), eval_every=6, save_every=100, **encoder)
    args = TrainArgs(**tiny_run(data=str(data), out=str(out), **run))
    res = finetune(args)
    assert res.val_losses[-1][1] < res.val_losses[0][1] - 0.1, res.val_losses
    assert any((tmp_path / "cache").iterdir())
    meta = json.loads((out / "adapter_config.json").read_text())
    assert "image_encoder_weights" in meta
    model = load_adapter(load_model(STORIES), out)
    assert model.adapter_config.visual_dim > 0 and model.adapter_config.image_encoder == "efficientnet-lite0"
    assert any("visual" in n for n, _ in model.named_parameters())
    assert (
        main(
            [
                "generate",
                "--model",
                str(STORIES),
                "--adapter",
                str(out),
                "--image",
                str(images[0]),
                "--prompt",
                "Describe the image.",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ]
        )
        == 0
    )


def test_image_with_text_only_adapter_is_one_line_error(tmp_path, capsys):
    rows = [{"instruction": "Say hi.", "output": "Hi there."}] * 8
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "text"
    finetune(TrainArgs(**tiny_run(data=str(data), out=str(out), max_steps=1, val_fraction=0.0)))
    img = str(sorted(IMAGES.glob("*.jpg"))[0])
    capsys.readouterr()
    rc = main(["generate", "--model", str(STORIES), "--adapter", str(out), "--image", img, "--prompt", "Hi"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "multimodal" in err and len(err.splitlines()) == 1, err
