import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import SHARED, STORIES, cli_flags, fault_env, story_data, tiny_run

from llama_adapter.adapter import load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import _finetune_argv, main
from llama_adapter.train import TrainArgs, cosine_lr, finetune, read_metrics
from llama_adapter.train import recipe as recipe_mod


def small_dataset(tmp_path: Path, n: int = 24) -> Path:
    return story_data(tmp_path, n)


def args_for(tmp_path: Path, data: Path, **kw) -> TrainArgs:
    base = dict(data=str(data), out=str(tmp_path / "run"), epochs=4, val_fraction=0.25, eval_every=5, save_every=3)
    return TrainArgs(**tiny_run(**{**base, **kw}))


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


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_resume_continues_the_same_loss_curve(tmp_path, pack):
    data = small_dataset(tmp_path)
    full = finetune(args_for(tmp_path / "a", data, pack=pack))
    finetune(args_for(tmp_path / "b", data, max_steps=7, pack=pack))
    with pytest.raises(ValueError, match="--resume"):
        finetune(args_for(tmp_path / "b", data, pack=pack))
    with pytest.raises(ValueError, match="trained with (padded batches|packed steps of [0-9]+ tokens), this run"):
        finetune(args_for(tmp_path / "b", data, pack=not pack, resume=True))
    resumed = finetune(args_for(tmp_path / "b", data, resume=True, pack=pack))
    rows = [r for r in read_metrics(tmp_path / "b" / "run") if r["loss"]]
    losses = [float(r["loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert resumed.steps == 16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(full.train_losses), atol=1e-5, rtol=1e-5)
    # the tokens column continues from the checkpoint (it used to restart from zero)
    ref_tokens = [int(r["tokens"]) for r in read_metrics(tmp_path / "a" / "run") if r["loss"]]
    assert [int(r["tokens"]) for r in rows] == ref_tokens and ref_tokens[7] > ref_tokens[6] > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    real = recipe_mod.token_loss_sum
    calls = {"n": 0}

    def flaky(model, batch, ctx=None):
        loss, n = real(model, batch, ctx)
        calls["n"] += 1
        if model.training and calls["n"] > 5:
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(recipe_mod, "token_loss_sum", flaky)
    res = finetune(args_for(tmp_path, data, save_every=1))
    assert res.stopped == "nan"
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{res.steps:07d}"
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_cli_finetune_then_generate_with_adapter(tmp_path, capsys):
    data = small_dataset(tmp_path)
    out = tmp_path / "cli"
    flags = cli_flags(model=STORIES, data=data, out=out, max_steps=3, template="alpaca", adapter_len=2, max_len=200)
    rc = main(["finetune", *flags, "--eval-every", "3"])
    assert rc == 0
    assert "held-out loss" in capsys.readouterr().out
    argv = ["generate", "--model", str(STORIES), "--adapter", str(out), "--prompt", "Tell a story about Lily."]
    rc = main([*argv, "--max-new-tokens", "8"])
    assert rc == 0
    assert capsys.readouterr().out.strip()


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert main(["finetune", *cli_flags(model=STORIES, data=tmp_path / "missing.json", out=tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.json" in err and "Traceback" not in err
    bad = tmp_path / "adapter"
    bad.mkdir()
    assert main(["generate", "--model", str(STORIES), "--adapter", str(bad), "--prompt", "hi"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_cli_adapters_list_inspect_and_convert_roundtrip(tmp_path, capsys):
    data = small_dataset(tmp_path)
    out = tmp_path / "ads" / "tiny"
    flags = cli_flags(model=STORIES, data=data, out=out, max_steps=2, template="alpaca", adapter_len=3, max_len=200)
    assert main(["finetune", *flags]) == 0
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
    real_save = recipe_mod.save_adapter
    monkeypatch.setattr(recipe_mod, "save_adapter", lambda m, *a, **k: trained.append(m) or real_save(m, *a, **k))
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
        (dict(visual_layers=2), "--visual-layers=2 .*needs image features.*drop --visual-layers"),
        (dict(visual_query_blocks=2), "--visual-query-blocks=2 needs an image encoder.*drop --visual-query-blocks"),
        (dict(image_encoder="efficientnet-lite0", visual_query_dim=32), "--visual-query-dim set.*drop them"),
        (dict(image_encoder="efficientnet-lite0", visual_layers=6, adapter_layers=5), "drop --visual-layers or lower"),
        (dict(feature_cache="cache"), "--feature-cache needs images"),
        (dict(adapter_len=0), "--adapter-len=0: need at least one prompt vector"),
    ],
)
def test_incompatible_adapter_flags_fail_before_loading(tmp_path, kw, match):
    # a model that does not exist: the option check must come first
    args = TrainArgs(model=str(tmp_path / "no-model.bin"), data=str(small_dataset(tmp_path)), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=match):
        finetune(TrainArgs(**{**args.__dict__, **kw}))
    assert not (tmp_path / "o").exists()


def test_adapter_layers_beyond_the_model_fail_after_the_base_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe_mod, "load_data", lambda *a, **k: pytest.fail("data read before the adapter check"))
    recipe = recipe_mod.Recipe(args_for(tmp_path, small_dataset(tmp_path), adapter_layers=6))
    with pytest.raises(ValueError, match="--adapter-layers=6, but the model has 5 layers; choose 1..5"):
        recipe.setup_model()


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


def test_finetune_help_takes_each_option_from_its_dataclass_comment(capsys):
    from dataclasses import fields

    from llama_adapter.cli import _field_comments, main
    from llama_adapter.config import AdapterConfig
    from llama_adapter.train import ADAPTER_OPTIONS

    own, adapter = _field_comments(TrainArgs), _field_comments(AdapterConfig)
    assert len(own) > 20 and set(ADAPTER_OPTIONS) - {"visual_query_heads"} <= set(own) | set(adapter)
    assert adapter["gate_init"].startswith("The gate's starting value")  # a comment above the field
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainArgs):
        if f.name != "extra":
            assert "--" + f.name.replace("_", "-") in text, f.name
    for name in ("bias_scale", "visual_layers", "data", "image_encoder", "adapter_len", "adapter_layers"):
        help = own.get(name) or adapter[name]
        assert " ".join(help.split()) in text, name
    assert own["adapter_layers"].startswith("None: min(30, n_layers)")  # TrainArgs' own default wins


def test_finetune_argv_round_trips():
    """The command line `--devices N` gives its processes parses back to the same TrainArgs."""
    from llama_adapter.cli import _finetune_argv, _parser

    targs = TrainArgs(
        data="a.json,b.jsonl", adapter_layers=3, bias_scale=True, lr=1e-3, max_steps=7, overwrite=True,
        visual_layers=2, image_encoder="efficientnet-lite0", clip_grad=0.5, devices=2, template="chatml",
    )  # fmt: skip
    for t in (targs, replace(targs, pack=False), replace(targs, batch_tokens=4096, max_len=300)):
        ns = _parser().parse_args(_finetune_argv(t, verbose=False))
        assert TrainArgs(**{f: getattr(ns, f) for f in t.__dict__ if hasattr(ns, f)}) == t


# ------------------------------------------------------- bad input and safe resume (issue 18)
def quick(tmp_path: Path, data: Path, **kw) -> TrainArgs:
    """12 training examples, 4 held out, batch 4: 3 steps an epoch, 6 in all; a checkpoint every step."""
    kw = {"epochs": 2, "save_every": 1, "eval_every": 3, "adapter_len": 2, "adapter_layers": 2, **kw}
    return args_for(tmp_path, data, **kw)


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("data"), n=16)


@pytest.fixture(scope="module")
def quick_reference(quick_data, tmp_path_factory) -> list[dict]:
    """metrics.csv of the uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    assert finetune(quick(out, quick_data)).steps == 6
    return read_metrics(out / "run")


def assert_same_curve(out: Path, ref: list[dict]) -> None:
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in ref]
    for key in ("loss", "val_loss"):
        got, want = ([float(r[key]) if r[key] else float("nan") for r in rs] for rs in (rows, ref))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5, equal_nan=True)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    ],
    ids=["ENOSPC", "torch-writer"],
)
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, quick_data, monkeypatch, capsys, error):
    real, calls = torch.save, []

    def save(obj, f, *args, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: adapter written, optimizer state cut short
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise error
        return real(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    argv = _finetune_argv(quick(tmp_path, quick_data), verbose=False)
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: could not write checkpoint step-0000002"), errors
    assert f"in {out / 'checkpoints'}: the disk is full" in errors[0]
    assert f"the previous checkpoint {out / 'checkpoints' / 'step-0000001'} is kept" in errors[0]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000001"
    assert not temporaries(out) and [p.name for p in (out / "checkpoints").iterdir()] == ["latest", "step-0000001"]


def test_resume_falls_back_from_a_damaged_checkpoint(tmp_path, quick_data, quick_reference, caplog):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    finetune(quick(tmp_path, quick_data, max_steps=4))  # keeps step-3 and step-4
    weights = ckpts / "step-0000004" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # what a save cut short leaves, here looking like a newer, complete checkpoint: never read
    shutil.copytree(ckpts / "step-0000003", ckpts / ".step-0000005.tmp")
    with caplog.at_level(logging.INFO, logger="llama_adapter.train"):
        res = finetune(quick(tmp_path, quick_data, resume=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint step-0000004: SafetensorError"), warnings
    assert warnings[0].endswith("is damaged; resuming from step-0000003, the newest intact one")
    assert res.steps == 6 and len(res.train_losses) == 6  # the result covers the whole run
    assert_same_curve(out, quick_reference)
    assert not temporaries(out)
    for d in ckpts.glob("step-*"):
        (d / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"^--resume: no intact checkpoint under .*JSONDecodeError.*--overwrite$"):
        finetune(quick(tmp_path, quick_data, resume=True))


BAD_FLAGS = [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--blr", "0"], "--blr 0.0: must be > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
    (["--epochs", "0"], "--epochs 0.0: must be > 0"),
    (["--max-steps", "-1"], "--max-steps -1: must be >= 1"),
    (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (["--max-len", "-5"], "--max-len -5: must be >= 2"),
    (["--warmup-steps", "-2"], "--warmup-steps -2: must be >= 0"),
    (["--eval-every", "0"], "--eval-every 0: must be >= 1"),
    (["--save-every", "0"], "--save-every 0: must be >= 1"),
    (["--val-fraction", "1"], "--val-fraction 1.0: must be in [0, 1)"),
    (["--precision", "fp8"], "--precision 'fp8': choose one of fp32, bf16, fp16"),
    (["--template", "llama3"], "--template 'llama3': choose auto or one of alpaca, chatml, plain"),
    (["--image-encoder", "resnet"], "--image-encoder 'resnet': choose one of efficientnet-lite0"),
    (["--strategy", "zero3"], "--strategy 'zero3': choose one of ddp, fsdp"),
    (["--batch-tokens", "0"], "--batch-tokens 0: must be >= 1"),
    (["--no-pack", "--batch-tokens", "2048"], "--batch-tokens sets the size of packed steps"),
    (["--adapter-layers", "0"], "--adapter-layers 0: must be >= 1"),
    (["--adapter-len", "0"], "--adapter-len=0: need at least one prompt vector"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--resume"], "holds no training run (no checkpoints/step-*); check --out, or start without --resume"),
]


@pytest.mark.parametrize("flags, match", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_every_flag_is_checked_before_anything_loads(tmp_path, capsys, flags, match):
    # the model does not exist and the data is never read: only the option check can answer
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "no-model.bin"), "--data", str(small_dataset(tmp_path))]
    assert main([*argv, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_data_that_is_a_directory_says_so(tmp_path, capsys):
    argv = ["finetune", "--model", str(tmp_path / "no-model.bin"), "--out", str(tmp_path / "run")]
    assert main([*argv, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --data {tmp_path} is a directory; pass a data file in it") and "\n" not in err
    assert main([*argv, "--data", str(small_dataset(tmp_path)), "--val-data", str(tmp_path)]) == 2
    assert f"--val-data {tmp_path} is a directory" in capsys.readouterr().err


def test_an_adapter_folder_is_overwritten_only_when_asked(tmp_path, quick_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("adapter_config.json", "adapter.safetensors", "notes.txt"):  # first: an adapter but no run
        (out / name).write_text("{}")
    argv = _finetune_argv(quick(tmp_path, quick_data, max_steps=1), verbose=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {out} holds an adapter (adapter_config.json) but no training run; pass --overwrite to replace "
        "it or choose another --out"
    )
    assert (out / "adapter.safetensors").read_text() == "{}"
    (out / "checkpoints" / "step-0000099").mkdir(parents=True)  # then: a run, replaced with --overwrite
    assert main([*argv, "--overwrite"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["latest", "step-0000001"]
    assert json.loads((out / "adapter_config.json").read_text())["adapter"]["adapter_len"] == 2
    assert (out / "notes.txt").read_text() == "{}"  # not a file of the run: kept


def test_drawing_the_loss_plot_prints_nothing_on_stderr(tmp_path):
    from llama_adapter.train import write_metrics

    rows = [
        {"step": 0, "loss": "", "val_loss": 3.0},
        {"step": 1, "loss": 3.2, "val_loss": ""},
        {"step": 2, "loss": 2.9, "val_loss": 2.8},
    ]
    write_metrics(tmp_path, rows)
    code = (
        "import logging, sys; from pathlib import Path; from llama_adapter.train import plot_losses; "
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr); plot_losses(Path(sys.argv[1]))"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "fresh-matplotlib-cache")}  # the font cache is rebuilt
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0 and (tmp_path / "loss.png").is_file(), p.stderr
    assert "font" not in p.stderr.lower(), p.stderr


def run_killed_then_resumed(tmp_path: Path, data: Path, env: dict[str, str], kill_after_s: float | None = None) -> bool:
    """`finetune` in a child process that dies of SIGKILL (the hook in `env`, or after `kill_after_s`),
    then `--resume` (or a fresh start when it died before its first checkpoint) to the end. Whether
    it was killed."""
    targs = quick(tmp_path, data)
    cmd = [sys.executable, "-m", "llama_adapter", *_finetune_argv(targs, verbose=False)]
    child = {"OMP_NUM_THREADS": "1", "LLAMA_ADAPTER_TEST_KILL_DIR": targs.out}
    p = subprocess.Popen(cmd, env={**env, **child}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    killed = p.returncode == -signal.SIGKILL
    assert killed or p.returncode == 0, err[-3000:]
    if killed:
        quiet = {**os.environ, **child}
        r = subprocess.run([*cmd, "--resume"], env=quiet, capture_output=True, text=True, timeout=600)
        if r.returncode == 2 and "holds no training run" in r.stderr:  # killed before its first checkpoint
            r = subprocess.run(cmd, env=quiet, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, err[-1500:] + r.stderr[-3000:]
    return killed


def test_kill_9_in_a_checkpoint_then_resume_gives_the_same_curve(tmp_path, quick_data, quick_reference):
    # the second optimizer state is torn mid-write, then the process dies: .step-0000002.tmp stays behind
    env = fault_env(LLAMA_ADAPTER_TEST_KILL_AT="2", LLAMA_ADAPTER_TEST_KILL_ON="torch.save")
    assert run_killed_then_resumed(tmp_path, quick_data, env)
    assert_same_curve(tmp_path / "run", quick_reference)
    assert not temporaries(tmp_path / "run") and (tmp_path / "run" / "adapter.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(24))
def test_kill_9_anywhere_then_resume_gives_the_same_curve(tmp_path, quick_data, quick_reference, trial):
    """Many kill points: every 4th trial a SIGKILL from outside after a random time, the others at
    a random event of the run (an optimizer step, or a write, rename or delete of its files)."""
    rng = random.Random(trial)
    if trial % 4 == 3:
        run_killed_then_resumed(tmp_path, quick_data, dict(os.environ), kill_after_s=rng.uniform(2.0, 25.0))
    else:
        run_killed_then_resumed(tmp_path, quick_data, fault_env(LLAMA_ADAPTER_TEST_KILL_AT=str(rng.randint(1, 100))))
    assert_same_curve(tmp_path / "run", quick_reference)
    assert not temporaries(tmp_path / "run") and (tmp_path / "run" / "adapter.safetensors").is_file()


# ------------------------------------------------------------------------------- packed batches (issue 17)
def test_packed_schedule_takes_as_many_steps_as_padded_and_scales_lr_by_mean_examples():
    from llama_adapter.train import Schedule

    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]  # 11 examples, 660 tokens
    padded = Schedule.plan(TrainArgs(pack=False, batch_size=4, blr=0.01), lengths, 1)
    packed = Schedule.plan(TrainArgs(batch_size=4, blr=0.01), lengths, 1)
    assert padded.steps_per_epoch == packed.steps_per_epoch == 2 and padded.step_tokens is None
    assert packed.step_tokens == 330 and packed.examples_per_step == 5.5  # no example dropped
    assert padded.lr == 0.01 * 4 / 256 and packed.lr == 0.01 * 5.5 / 256
    fixed = Schedule.plan(TrainArgs(batch_tokens=200, blr=0.01), lengths, 2)  # 2 processes: same steps
    assert fixed.steps_per_epoch == 4 and fixed.step_tokens == 200 and fixed.examples_per_step == 11 / 4
    with pytest.raises(ValueError, match="more micro-batches than the 11 examples; raise --batch-tokens"):
        Schedule.plan(TrainArgs(batch_tokens=100, grad_accum=2), lengths, 1)


def test_default_max_len_cuts_nothing_and_says_so(tmp_path, caplog):
    rows = [{"instruction": "Tell a long story.", "input": "", "output": " ".join(["Lily went to the park."] * 25)}]
    rows += json.loads(small_dataset(tmp_path).read_text())
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    with caplog.at_level(logging.INFO, logger="llama_adapter.train"):
        finetune(args_for(tmp_path, data, max_len=None, max_steps=1, val_fraction=0.0, epochs=1))
    msg = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training examples")]
    assert len(msg) == 1 and "0 truncated, 0 dropped at max length 512" in msg[0], msg  # stories260K's context
    longest = int(msg[0].split("longest ")[1].split(")")[0])
    assert longest > 200, msg  # longer than the old default cut (and tiny_run's max_len)
