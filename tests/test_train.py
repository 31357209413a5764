import json
from pathlib import Path

import pytest
import torch

from llama_adapter import train as train_mod
from llama_adapter.adapter import load_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import main
from llama_adapter.train import TrainArgs, cosine_lr, finetune, read_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES = SHARED / "llama2c" / "stories260K.bin"


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
