import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED, STORIES

from llama_adapter import train as train_mod
from llama_adapter.adapter import load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import main
from llama_adapter.train import TrainArgs, cosine_lr, finetune, read_metrics


def small_dataset(tmp_path: Path, n: int = 24) -> Path:
    rows = [
        {"instruction": f"Tell a story about {name}.", "input": "", "output": f"{name} went to the park and was happy."}
        for name in ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Amy"] * (n // 8)
    ]
    p = tmp_path / "data.json"
    p.write_text(json.dumps(rows))
    return p


def args_for(tmp_path: Path, data: Path, **kw) -> TrainArgs:
    base = dict(
        model=str(STORIES),
        data=str(data),
        out=str(tmp_path / "run"),
        template="alpaca",
        adapter_len=4,
        adapter_layers=5,
        epochs=4,
        batch_size=4,
        lr=2e-2,
        warmup_steps=2,
        max_len=200,
        val_fraction=0.25,
        eval_every=5,
        save_every=3,
        seed=0,
    )
    base.update(kw)
    return TrainArgs(**base)


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 10, 2, 1.0, 0.0) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05


def test_finetune_lowers_loss_and_changes_only_adapter(tmp_path):
    data = small_dataset(tmp_path)
    base_before = load_model(STORIES).state_dict()
    res = finetune(args_for(tmp_path, data))
    assert res.steps == 16
    assert res.val_losses[-1][1] < res.val_losses[0][1] - 0.1, res.val_losses
    assert sum(res.train_losses[-3:]) < sum(res.train_losses[:3])
    out = tmp_path / "run"
    for name in ["adapter.safetensors", "adapter_config.json", "metrics.csv", "loss.png"]:
        assert (out / name).is_file(), name
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["adapter"]["adapter_len"] == 4 and meta["base"]["config"]["dim"] == 64
    # Base weights bit-identical; adapter actually trained.
    base = load_model(STORIES)
    model = load_adapter(base, out)
    for k, v in base_before.items():
        assert torch.equal(model.model.state_dict()[k], v), k
    assert model.adapter.gates.abs().sum() > 0


def test_resume_continues_the_same_loss_curve(tmp_path):
    data = small_dataset(tmp_path)
    full = finetune(args_for(tmp_path / "a", data))
    finetune(args_for(tmp_path / "b", data, max_steps=7))
    with pytest.raises(ValueError, match="--resume"):
        finetune(args_for(tmp_path / "b", data))
    resumed = finetune(args_for(tmp_path / "b", data, resume=True))
    rows = [r for r in read_metrics(tmp_path / "b" / "run") if r["loss"]]
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert resumed.steps == 16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full.train_losses), atol=1e-5, rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    real = train_mod.token_loss_sum
    calls = {"n": 0}

    def flaky(model, batch, ctx=None):
        loss, n = real(model, batch, ctx)
        calls["n"] += 1
        if model.training and calls["n"] > 5:
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(train_mod, "token_loss_sum", flaky)
    res = finetune(args_for(tmp_path, data, save_every=1))
    assert res.stopped == "nan"
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{res.steps:07d}"
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_cli_finetune_then_generate_with_adapter(tmp_path, capsys):
    data = small_dataset(tmp_path)
    out = tmp_path / "cli"
    rc = main(
        [
            "finetune",
            "--model",
            str(STORIES),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--template",
            "alpaca",
            "--adapter-len",
            "2",
            "--max-len",
            "200",
            "--eval-every",
            "3",
        ]
    )
    assert rc == 0
    assert "held-out loss" in capsys.readouterr().out
    rc = main(
        [
            "generate",
            "--model",
            str(STORIES),
            "--adapter",
            str(out),
            "--prompt",
            "Tell a story about Lily.",
            "--max-new-tokens",
            "8",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip()


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "finetune",
                "--model",
                str(STORIES),
                "--data",
                str(tmp_path / "missing.json"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.json" in err and "Traceback" not in err
    bad = tmp_path / "adapter"
    bad.mkdir()
    assert main(["generate", "--model", str(STORIES), "--adapter", str(bad), "--prompt", "hi"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_cli_adapters_list_inspect_and_convert_roundtrip(tmp_path, capsys):
    data = small_dataset(tmp_path)
    out = tmp_path / "ads" / "tiny"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(STORIES),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--template",
                "alpaca",
                "--adapter-len",
                "3",
                "--max-len",
                "200",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["adapters", "list", str(tmp_path / "ads")]) == 0
    listing = capsys.readouterr().out
    assert "tiny" in listing and "3240" not in listing and " 3 " in listing
    assert main(["adapters", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["adapter_len"] == 3 and info["base"]["dim"] == 64
    assert main(["convert", "adapter", str(out), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert main(["convert", "adapter", str(tmp_path / "peft"), str(tmp_path / "back"), "--base", str(STORIES)]) == 0
    before = load_adapter(load_model(STORIES), out).adapter.prompts
    after = load_adapter(load_model(STORIES), tmp_path / "back").adapter.prompts
    assert torch.equal(before, after)


# ------------------------------------------------------------------ V2 options, visual query, joint data
IMAGES = SHARED / "flickr8k_1k" / "images"
needs_images = pytest.mark.skipif(not IMAGES.is_dir(), reason="shared Flickr images missing")


def image_jsonl(tmp_path: Path, n_images: int = 4, repeat: int = 4) -> Path:
    words = ["dog", "girl", "boat", "ball", "cat", "car"]
    rows = [
        {"image": str(p), "instruction": "Describe the image.", "output": f"A {w} is in the park."}
        for p, w in zip(sorted(IMAGES.glob("*.jpg"))[:n_images], words)
    ] * repeat
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reloaded_val_losses(out: Path, val: str, cache: Path | None = None) -> dict[str, float]:
    """Held-out losses recomputed from disk, batched as fit batches them: "frozen" (the base alone),
    "adapter" (each row with its own image when `cache` is given) and, for image adapters,
    "no_image" (every row has_image False)."""
    from llama_adapter.data import InstructionDataset, collate
    from llama_adapter.tokenizer import load_tokenizer
    from llama_adapter.train import evaluate_loss, load_data

    base = load_model(STORIES)
    tok = load_tokenizer(base.config.extra["tokenizer"])
    exs = load_data(val, images=cache is not None)

    def loss(model, vis=None, make_ctx=None) -> float:
        ds = InstructionDataset(exs, tok, "alpaca", 200, visual=vis)
        order = sorted(range(len(ds)), key=lambda j: -len(ds[j].input_ids))
        batches = [collate([ds[i] for i in order[s : s + 4]], tok.pad_id) for s in range(0, len(ds), 4)]
        return evaluate_loss(model, batches, make_ctx=make_ctx)

    out_losses = {"frozen": loss(base)}  # before load_adapter wraps the base in place
    model = load_adapter(base, out)
    if cache is None:
        out_losses["adapter"] = loss(model)
        return out_losses
    from llama_adapter.multimodal import example_visuals, load_image_encoder, uses_tokens, visual_make_ctx

    enc = load_image_encoder(model.adapter_config.image_encoder)
    vis = example_visuals(exs, enc, cache, tokens=uses_tokens(model.adapter_config))
    make_ctx = visual_make_ctx(model)
    out_losses["adapter"] = loss(model, vis, make_ctx)
    out_losses["no_image"] = loss(model, [None] * len(vis), make_ctx)
    return out_losses


def final_val(out: Path) -> tuple[float, float]:
    vals = [float(r["val_loss"]) for r in read_metrics(out) if r["val_loss"]]
    return vals[0], vals[-1]


def test_cli_finetune_v2_bias_scale_norms_roundtrip(tmp_path, capsys, monkeypatch):
    from llama_adapter.v2 import AdapterRMSNorm, ScaledLinear

    trained = []
    real_save = train_mod.save_adapter
    monkeypatch.setattr(train_mod, "save_adapter", lambda m, *a, **k: trained.append(m) or real_save(m, *a, **k))
    data = small_dataset(tmp_path)
    out = tmp_path / "v2"
    argv = ["finetune", "--model", str(STORIES), "--data", str(data), "--val-data", str(data), "--out", str(out)]
    argv += ["--max-steps", "3", "--template", "alpaca", "--adapter-len", "2", "--adapter-layers", "3"]
    argv += ["--max-len", "200", "--eval-every", "3", "--lr", "2e-2", "--bias-scale", "--train-norms"]
    assert main(argv) == 0
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["adapter"]["bias_scale"] and meta["adapter"]["train_norms"]
    assert meta["train"]["bias_scale"] and meta["adapter"]["adapter_layers"] == 3
    model = load_adapter(load_model(STORIES), out)
    wq = model.model.layers[0].attention.wq
    assert isinstance(wq, ScaledLinear) and wq.adapter_bias.abs().sum() > 0  # layer 0 trained, not only the top 3
    assert isinstance(model.model.norm, AdapterRMSNorm)
    idx = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():  # the model rebuilt from disk computes exactly what the trained one did
        assert torch.equal(model(idx), trained[-1](idx))
    first, last = final_val(out)
    assert last < first
    # the adapter rebuilt from adapter_config.json + safetensors computes the run's own last held-out loss
    got = reloaded_val_losses(out, str(data))
    assert got["adapter"] == pytest.approx(last, rel=1e-5) and got["frozen"] == pytest.approx(first, rel=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(visual_layers=2), "--visual-layers needs images.*drop --visual-layers"),
        (dict(visual_query_blocks=2), "drop --visual-query-blocks or add --image-encoder"),
        (dict(image_encoder="efficientnet-lite0", visual_query_dim=32), "drop --visual-query-dim"),
        (dict(image_encoder="efficientnet-lite0", visual_layers=6, adapter_layers=5), "lower or drop --visual-layers"),
    ],
)
def test_incompatible_v2_flags_fail_before_loading(tmp_path, kw, match):
    # a model that does not exist: the option check must come first
    args = TrainArgs(model=str(tmp_path / "no-model.bin"), data=str(small_dataset(tmp_path)), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=match):
        finetune(TrainArgs(**{**args.__dict__, **kw}))


@needs_images
def test_image_data_without_encoder_is_an_error(tmp_path, capsys):
    imgs = image_jsonl(tmp_path)
    argv = ["finetune", "--model", str(STORIES), "--data", f"{small_dataset(tmp_path)},{imgs}", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "images.jsonl holds image-text rows" in err and "--image-encoder" in err and len(err.splitlines()) == 1


@needs_images
def test_finetune_visual_query_blocks_on_images(tmp_path):
    data = image_jsonl(tmp_path)
    out, cache = tmp_path / "vq", tmp_path / "cache"
    vq = dict(image_encoder="efficientnet-lite0", feature_cache=str(cache), visual_query_blocks=1, visual_query_dim=32)
    res = finetune(args_for(tmp_path, data, out=str(out), val_data=str(data), epochs=4, eval_every=100, **vq))
    assert res.val_losses[-1][1] < res.val_losses[0][1] - 0.1, res.val_losses
    cfg = json.loads((out / "adapter_config.json").read_text())["adapter"]
    assert (cfg["visual_query_blocks"], cfg["visual_tokens"], cfg["visual_token_dim"]) == (1, 49, 1280)
    assert cfg["visual_dim"] == 49 * 1280 and cfg["image_encoder"] == "efficientnet-lite0"
    assert any(p.name.endswith("-tokens") for p in cache.iterdir())
    got = reloaded_val_losses(out, str(data), cache)
    assert got["adapter"] == pytest.approx(res.val_losses[-1][1], rel=1e-5)
    # the captions differ per image, so the trained queries must carry image information
    assert got["adapter"] < got["no_image"] - 0.05, got
    img = str(sorted(IMAGES.glob("*.jpg"))[0])
    argv = ["generate", "--model", str(STORIES), "--adapter", str(out), "--image", img]
    assert main([*argv, "--prompt", "Describe the image.", "--max-new-tokens", "4", "--temperature", "0"]) == 0


@needs_images
def test_joint_text_and_image_training_with_early_fusion(tmp_path):
    from llama_adapter.multimodal import visual_make_ctx

    text, imgs = small_dataset(tmp_path), image_jsonl(tmp_path)
    out, cache = tmp_path / "joint", tmp_path / "cache"
    both = f"{text},{imgs}"
    joint = dict(image_encoder="efficientnet-lite0", feature_cache=str(cache), visual_layers=2, bias_scale=True)
    res = finetune(args_for(tmp_path, both, out=str(out), val_data=both, epochs=2, eval_every=100, **joint))
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["train"]["n_train"] == 24 + 16 and meta["adapter"]["visual_layers"] == 2
    assert res.val_losses[-1][1] < res.val_losses[0][1] - 0.1, res.val_losses
    # text-only and caption held-out losses both fall, each recomputed from the saved adapter
    for path in (text, imgs):
        got = reloaded_val_losses(out, str(path), cache)
        assert got["adapter"] < got["frozen"] - 0.1, (path.name, got)
    model = load_adapter(load_model(STORIES), out)
    idx = torch.tensor([[1, 20, 30, 40, 50], [1, 21, 31, 41, 51]])
    make_ctx = visual_make_ctx(model)
    with torch.no_grad():
        # a text row (no image, zero features) is exactly the text adapter
        got, want = model(idx, ctx=make_ctx({"input_ids": idx})), model(idx, ctx=model.prompt_state())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # [B, K, dim] vs [1, K, dim] prompts
        vis = torch.randn(2, model.adapter_config.visual_dim)
        st = model.prompt_state(visual=vis, has_image=torch.tensor([True, True]))
        plain = model.prompt_state()
    same = [torch.equal(st.get(i).prompt.expand(2, -1, -1), plain.get(i).prompt.expand(2, -1, -1)) for i in st.layers]
    assert same == [False, False, True, True, True]  # early fusion: images reach the first 2 adapted layers only


def test_schedule_steps_anneals_a_short_run(tmp_path):
    data = small_dataset(tmp_path)
    kw = dict(max_steps=5, warmup_steps=1, val_fraction=0.0, save_every=100)
    finetune(args_for(tmp_path / "a", data, **kw))
    finetune(args_for(tmp_path / "b", data, schedule_steps=5, **kw))
    lrs = {k: [float(r["lr"]) for r in read_metrics(tmp_path / k / "run") if r["loss"]] for k in "ab"}
    assert lrs["a"][-1] > 0.9 * 2e-2  # the schedule spans 4 epochs: still near the peak at step 5
    assert lrs["b"] == pytest.approx([cosine_lr(s, 5, 1, 2e-2, 0.0) for s in range(5)])
    assert lrs["b"][-1] < 0.2 * 2e-2


def test_finetune_help_takes_each_option_from_its_trainargs_comment(capsys):
    import inspect

    from llama_adapter.cli import _field_comments, main

    comments = _field_comments(TrainArgs)
    lines = [line.strip() for line in inspect.getsource(TrainArgs).splitlines()]
    commented = [line for line in lines if ": " in line and "  # " in line and not line.startswith("#")]
    assert len(comments) == len(commented) > 20
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("bias_scale", "visual_layers", "data", "image_encoder"):
        assert " ".join(comments[name].split()) in text, name
