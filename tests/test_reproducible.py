"""Same seed, same result: the same command twice on CPU gives byte-identical adapter files and the
same metrics (finetune with and without images, the bind projection, evaluation). Each command runs
in its own process, as a user would run it."""

import json
import subprocess
import sys

import pytest
from helpers import FLICKR, cli_flags, story_data, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("tokens_per_s", "elapsed_s", "seconds")


def run(*argv: str) -> None:
    r = subprocess.run([sys.executable, "-m", "llama_adapter", *argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def metrics(out) -> list[dict]:  # noqa: ANN001
    import csv

    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def image_data(folder):  # noqa: ANN001
    photos = sorted((FLICKR / "images").glob("*.jpg"))[:8]
    rows = [{"image": str(p), "instruction": "Describe the image.", "output": f"A photo number {i}."}
            for i, p in enumerate(photos)]  # fmt: skip
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("images", [False, True])
def test_finetune_twice_gives_identical_files(tmp_path, images):
    if images and not (FLICKR / "images").is_dir():
        pytest.skip("flickr photos not found")
    data = image_data(tmp_path) if images else story_data(tmp_path)
    extra = {"image_encoder": "clip-tiny", "feature_cache": str(tmp_path / "cache")} if images else {}
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        flags = cli_flags(**{**tiny_run(data=str(data), out=str(out), max_steps=4, save_every=2, eval_every=2,
                                        val_fraction=0.25, batch_size=2), **extra})  # fmt: skip
        run("finetune", *flags)
        outs.append(out)
    a, b = outs
    assert (a / "adapter.safetensors").read_bytes() == (b / "adapter.safetensors").read_bytes()
    assert metrics(a) == metrics(b) and len(metrics(a)) >= 4
    if images:  # evaluation of the same adapter, twice: the same report
        reports = []
        for i in range(2):
            rep = tmp_path / f"eval{i}.json"
            run("evaluate", "--model", tiny_run()["model"], "--adapter", str(a), "--task", "loss", "--data", str(data),
                "--report", str(rep), "--no-progress")  # fmt: skip
            report = {k: v for k, v in json.loads(rep.read_text()).items() if k not in TIMING}
            report["args"].pop("report")
            reports.append(report)
        assert reports[0] == reports[1]


def test_bind_projection_twice_gives_identical_weights():
    import torch

    from llama_adapter.multimodal import train_bind_projection

    g = torch.Generator().manual_seed(3)
    audio, image = torch.randn(40, 12, generator=g), torch.randn(40, 8, generator=g)
    a, loss_a = train_bind_projection(audio, image, steps=20, batch_size=16, seed=5)
    torch.manual_seed(123)  # the caller's global RNG state does not matter
    b, loss_b = train_bind_projection(audio, image, steps=20, batch_size=16, seed=5)
    assert loss_a == loss_b
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
