"""Distributed training on CPU (gloo, 2 processes) against the single-process reference.

Processes are real: `llama-adapter finetune --devices 2` (our launcher) and torchrun, run as
subprocesses with a timeout, each process limited to one thread.
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import STORIES, cli_flags, fault_env, story_data, tiny_run
from safetensors.torch import load_file

from llama_adapter.cli import main
from llama_adapter.distributed import setup_distributed
from llama_adapter.train import TrainArgs, finetune, resolve_grad_accum

pytestmark = pytest.mark.skipif(
    not STORIES.is_file() or not dist.is_gloo_available(), reason="needs stories260K and the gloo backend"
)

# 24 examples, 6 held out: 18 train -> 4 steps per epoch at a global batch of 4, 8 steps in all.
RUN = tiny_run(epochs=2, val_fraction=0.25, eval_every=4, save_every=3, max_len=256)
TIMEOUT = 180


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full_env)


def devices_cmd(data: Path, out: Path, **kw) -> list[str]:
    """`llama-adapter finetune --devices 2 ...` (our launcher)."""
    return [
        sys.executable,
        "-m",
        "llama_adapter",
        "finetune",
        "--devices",
        "2",
        *cli_flags(data=data, out=out, **{**RUN, **kw}),
    ]


def torchrun_cmd(data: Path, out: Path, **kw) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "llama_adapter",
        "finetune",
        *cli_flags(data=data, out=out, **{**RUN, **kw}),
    ]


def single(data: Path, out: Path, **kw):
    return finetune(TrainArgs(data=str(data), out=str(out), **{**RUN, "batch_size": 4, **kw}))


def losses(out: Path) -> tuple[list[float], dict[int, float]]:
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    return (
        [float(r["loss"]) for r in rows if r["loss"]],
        {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]},
    )


def assert_same_run(out: Path, ref: Path) -> None:
    # metrics.csv rounds losses to 6 decimals; 1e-5 is well above that and far below any real change.
    train, val = losses(out)
    ref_train, ref_val = losses(ref)
    assert len(train) == len(ref_train) == 8
    torch.testing.assert_close(torch.tensor(train), torch.tensor(ref_train), rtol=0, atol=1e-5)
    # A run stopped by --max-steps also evaluates where it stopped; compare the reference's steps.
    assert ref_val.keys() <= val.keys()
    torch.testing.assert_close(
        torch.tensor([val[s] for s in ref_val]), torch.tensor(list(ref_val.values())), rtol=0, atol=1e-5
    )
    got, want = load_file(out / "adapter.safetensors"), load_file(ref / "adapter.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    # Same format as a single-process adapter: same config keys, same adapter/base description.
    meta, ref_meta = (json.loads((d / "adapter_config.json").read_text()) for d in (out, ref))
    assert meta.keys() == ref_meta.keys()
    assert meta["adapter"] == ref_meta["adapter"] and meta["base"] == ref_meta["base"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return story_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """1 process x batch 4: the run every distributed variant must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = single(data, out)
    assert res.steps == 8
    return out


@pytest.mark.parametrize("launcher,strategy", [("devices", "ddp"), ("torchrun", "fsdp")])
def test_two_processes_x_batch_2_match_one_process_x_batch_4(data, reference, tmp_path, launcher, strategy):
    out = tmp_path / "run"
    cmd = (devices_cmd if launcher == "devices" else torchrun_cmd)(data, out, batch_size=2, strategy=strategy)
    p = run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("trained 8 steps") == 1, p.stdout  # rank 0 alone reports
    assert f"2 processes, backend gloo, strategy {strategy}" in p.stderr
    assert_same_run(out, reference)
    state = json.loads(
        (out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 2 and state["global_batch"] == 4


def test_resume_with_another_world_size_continues_the_same_curve(data, reference, tmp_path):
    out = tmp_path / "run"
    single(data, out, max_steps=3)  # 1 process: steps 1-3
    p = run(devices_cmd(data, out, batch_size=2, strategy="fsdp", max_steps=6, resume=True))  # 2 processes: 4-6
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "at step 3" in p.stderr
    res = single(data, out, resume=True)  # 1 process again: 7-8
    assert res.steps == 8
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert_same_run(out, reference)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_failing_rank_stops_the_run_with_a_clear_error(data, tmp_path, mode):
    env = fault_env(
        LLAMA_ADAPTER_TEST_CRASH_RANK="1", LLAMA_ADAPTER_TEST_CRASH_STEP="2", LLAMA_ADAPTER_TEST_CRASH_MODE=mode
    )
    t0 = time.monotonic()
    p = run(devices_cmd(data, tmp_path / "run", batch_size=2, dist_timeout_s=4, eval_every=100), env)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "simulated failure" in p.stderr
    if mode == "exit":
        # The launcher sees rank 1 die (or rank 0 notices the closed connection first).
        assert "rank 1 of 2 exited with code 17" in p.stderr or "a collective failed" in p.stderr, p.stderr[-3000:]
    else:
        # Rank 1 hangs: rank 0's collective times out after 4 s, then the launcher stops rank 1.
        assert "rank 0 of 2: a collective failed" in p.stderr and "Timed out" in p.stderr, p.stderr[-3000:]
        assert "rank 0 of 2 exited with code 1; stopping ranks 1" in p.stderr
    assert "Traceback" not in p.stderr
    assert elapsed < 90


def test_bad_distributed_input(data, tmp_path, monkeypatch, capsys):
    # A global batch that the processes cannot split: one error, before any process starts.
    with pytest.raises(ValueError, match="not divisible by --batch-size 2 x 2 processes = 4"):
        resolve_grad_accum(TrainArgs(batch_size=2, global_batch=6), world_size=2)
    assert resolve_grad_accum(TrainArgs(batch_size=2, global_batch=8), world_size=2) == 2
    with pytest.raises(ValueError, match="contradicts"):
        resolve_grad_accum(TrainArgs(batch_size=2, grad_accum=3, global_batch=8), world_size=2)
    rc = main(
        ["finetune", *cli_flags(model=STORIES, data=data, out=tmp_path / "x", devices=2, batch_size=2, global_batch=6)]
    )
    assert rc == 2 and "not divisible" in capsys.readouterr().err
    rc = main(["finetune", *cli_flags(model=STORIES, data=data, out=tmp_path / "x", devices=2, strategy="zero3")])
    assert rc == 2 and "choose one of ddp, fsdp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    # A dataset smaller than one global batch (18 training examples, batch 8 x accumulation 3).
    with pytest.raises(ValueError, match="fewer than one global batch of 24"):
        single(data, tmp_path / "small", batch_size=8, grad_accum=3)

    # Resuming with another global batch would replay other data at another lr.
    single(data, tmp_path / "gb", max_steps=1)
    with pytest.raises(ValueError, match="global batch of 4, this run has 2"):
        single(data, tmp_path / "gb", batch_size=2, resume=True)

    # torchrun started another number of processes than --devices says.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun started 2 processes"):
        setup_distributed(devices=4)
