"""Multimodal inference from the command line: `generate` batches mixing rows with and without
images, `chat --image` and `/image`, the image encoder weights recorded in an adapter's metadata,
and one-line errors. The base is stories260K, the encoder `clip-tiny` with weights saved to a file
(so the metadata path matters); the adapter's gates and projection are randomised so an image
visibly changes what is generated."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, save_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import main
from llama_adapter.evaluate import EvalArgs, run
from llama_adapter.generate import SamplingParams, generate_text
from llama_adapter.loading import encoder_weights, image_prompt_state
from llama_adapter.multimodal import CLIP_CONFIGS, ClipViTEncoder, load_image_encoder
from llama_adapter.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = ["--max-new-tokens", "10", "--temperature", "0"]


def photo(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def clip_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file({k: v.contiguous() for k, v in ClipViTEncoder(CLIP_CONFIGS["clip-tiny"]).state_dict().items()}, path)
    return path


def make_adapter(out: Path, stories: Path, *, visual: bool, weights: str | None = None) -> Path:
    base = load_model(stories)
    kw = {"visual_dim": 4 * 32, "image_encoder": "clip-tiny"} if visual else {}
    torch.manual_seed(0)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=4, adapter_layers=5, **kw))
    with torch.no_grad():  # a "trained" adapter: open gates, a projection that moves the prompts a lot
        model.adapter.gates.fill_(1.0)
        if visual:
            for p in model.adapter_visual.parameters():
                p.normal_(0, 0.2)  # 1.0 saturates: every image then gives the same text
    meta = {"template": "plain"}
    if visual:
        meta["image_encoder_weights"] = weights
    save_adapter(model, out, metadata=meta)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, stories260k):
    d = tmp_path_factory.mktemp("mmcli")
    w = clip_weights(d / "clip_a.safetensors", seed=123)
    other = clip_weights(d / "clip_b.safetensors", seed=7)
    return {
        "dir": d,
        "stories": str(stories260k),
        "mm": make_adapter(d / "mm", stories260k, visual=True, weights=str(w)),
        "text": make_adapter(d / "text", stories260k, visual=False),
        "weights": w,
        "other": other,
        "img1": photo(d / "one.png", 1),
        "img2": photo(d / "two.png", 2),
    }


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def batch_outputs(capsys, env, rows: list[dict], *extra: str) -> list[str]:
    f = env["dir"] / f"batch{len(rows)}_{abs(hash(json.dumps(rows))) % 10_000}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli(
        capsys, "generate", "--model", env["stories"], "--adapter", env["mm"], "--batch", f, *GEN, *extra
    )
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in recs] == [r["prompt"] for r in rows]
    return [r["output"] for r in recs]


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


# ---------------------------------------------------------------- batches with and without images


def test_mixed_batch_rows_equal_each_row_alone(env, capsys):
    rows = [
        {"prompt": "Once upon a time", "image": env["img1"]},
        {"prompt": "Once upon a time", "image": None},
        {"prompt": "The cat sat", "image": env["img2"]},
        {"prompt": "Lily went to the park and", "image": None},
    ]
    mixed = batch_outputs(capsys, env, rows)
    alone = [batch_outputs(capsys, env, [r])[0] for r in rows]
    assert mixed == alone
    # The image matters (else the equalities above would prove little) ...
    assert mixed[0] != mixed[1]
    # ... and a row without an image is exactly the text-only adapter's output.
    rc, out, _ = cli(
        capsys, "generate", "--model", env["stories"], "--adapter", env["mm"], "--prompt", rows[1]["prompt"], *GEN
    )
    assert rc == 0 and out.rstrip("\n") == mixed[1]


def test_repeated_image_flags_align_with_prompts(env, capsys):
    argv = ["generate", "--model", env["stories"], "--adapter", env["mm"], *GEN]
    rc, out, err = cli(
        capsys,
        *argv,
        "--prompt",
        "Once upon a time",
        "--image",
        env["img1"],
        "--prompt",
        "Once upon a time",
        "--image",
        "none",
        "--prompt",
        "The cat sat",
        "--image",
        "-",
    )
    assert rc == 0, err
    blocks = re.split(r"^--- \[\d\].*\n", out, flags=re.M)[1:]
    want = batch_outputs(
        capsys,
        env,
        [
            {"prompt": "Once upon a time", "image": env["img1"]},
            {"prompt": "Once upon a time", "image": None},
            {"prompt": "The cat sat", "image": None},
        ],
    )
    assert [b.rstrip("\n") for b in blocks] == want
    # One image for several prompts applies to every row.
    rc, out, _ = cli(capsys, *argv, "--prompt", "Once upon a time", "--prompt", "The cat sat", "--image", env["img1"])
    blocks = [b.rstrip("\n") for b in re.split(r"^--- \[\d\].*\n", out, flags=re.M)[1:]]
    assert rc == 0 and blocks == batch_outputs(
        capsys,
        env,
        [
            {"prompt": "Once upon a time", "image": env["img1"]},
            {"prompt": "The cat sat", "image": env["img1"]},
        ],
    )
    rc, _, err = cli(
        capsys, *argv, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--image", env["img1"], "--image", "none"
    )
    one_line_error(rc, err, "2 --image for 3 --prompt")


def test_batch_file_relative_paths_chunks_and_errors(env, capsys, tmp_path):
    shutil.copy(env["img1"], tmp_path / "rel.png")
    f = tmp_path / "b.jsonl"
    f.write_text(
        json.dumps({"prompt": "Once upon a time", "image": "rel.png"})
        + "\n\n"
        + json.dumps({"prompt": "The cat sat"})
        + "\n"
    )
    argv = ["generate", "--model", env["stories"], "--adapter", env["mm"], *GEN]
    rc, out, err = cli(capsys, *argv, "--batch", f, "--batch-size", "1")
    assert rc == 0, err
    recs = [json.loads(x) for x in out.splitlines()]
    assert recs[0]["image"] == str(tmp_path / "rel.png") and recs[1]["image"] is None
    assert [r["output"] for r in recs] == batch_outputs(
        capsys, env, [{"prompt": "Once upon a time", "image": env["img1"]}, {"prompt": "The cat sat", "image": None}]
    )
    f.write_text(json.dumps({"prompt": "x", "image": "missing.png"}) + "\n")
    one_line_error(*cli(capsys, *argv, "--batch", f)[::2], "missing.png", "not found")
    f.write_text('{"image": "rel.png"}\n')
    one_line_error(*cli(capsys, *argv, "--batch", f)[::2], "b.jsonl:1", "prompt")
    one_line_error(*cli(capsys, *argv, "--batch", f, "--prompt", "x")[::2], "--batch FILE replaces")


def test_image_prompt_state_text_rows_add_nothing(env):
    """Library level: logits of a text-only row in a mixed batch equal the text-only adapter's."""
    from llama_adapter.adapter import load_adapter

    model = load_adapter(load_model(env["stories"]), env["mm"]).eval()
    tok = load_tokenizer(model.config.extra["tokenizer"])
    idx = torch.tensor([tok.encode("Once upon a time", bos=True)] * 2)
    w = str(env["weights"])
    with torch.no_grad():
        mixed = model(idx, ctx=image_prompt_state(model, [env["img1"], None], weights=w))
        text = model(idx[:1], ctx=image_prompt_state(model, [None]))
        img = model(idx[:1], ctx=image_prompt_state(model, [env["img1"]], weights=w))
    torch.testing.assert_close(mixed[1:], text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[:1], img, rtol=1e-5, atol=1e-5)
    assert (img - text).abs().max() > 1e-2
    params = SamplingParams(max_new_tokens=6)
    a = generate_text(model, tok, ["Once upon a time"], params, ctx=image_prompt_state(model, [None]))
    b = generate_text(model, tok, ["Once upon a time"], params)  # no ctx: the adapter's own text prompts
    assert a == b


# ---------------------------------------------------------------- chat


def chat(capsys, monkeypatch, env, stdin: str, *extra: str, adapter: str = "mm") -> tuple[int, list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc, out, err = cli(
        capsys, "chat", "--model", env["stories"], "--adapter", env[adapter], *GEN, "--stop", "\n", *extra
    )
    # stdout holds one "> " per input line and each reply on its own line.
    replies = [re.sub(r"^(> )+", "", ln) for ln in out.split("\n")]
    return rc, [r for r in replies if r.strip()], err


def test_chat_image_flag_and_command_give_the_same_reply(env, capsys, monkeypatch):
    rc, with_flag, err = chat(capsys, monkeypatch, env, "Hi there\n", "--image", env["img1"])
    assert rc == 0 and len(with_flag) == 1, (with_flag, err)
    rc, without, _ = chat(capsys, monkeypatch, env, "Hi there\n")
    assert rc == 0 and with_flag != without
    script = f"/image {env['img1']}\nHi there\n/reset\n/image none\nHi there\n/reset\n/image {env['img2']}\nHi there\n"
    rc, replies, err = chat(capsys, monkeypatch, env, script)
    assert rc == 0 and "image attached" in err and "image detached" in err
    assert replies[:2] == [with_flag[0], without[0]]
    assert replies[2] not in (with_flag[0], without[0])  # another image, another reply


def test_chat_bad_images_are_one_line_and_the_chat_goes_on(env, capsys, monkeypatch, tmp_path):
    notimg = tmp_path / "notes.png"
    notimg.write_text("not an image")
    script = f"/image {tmp_path / 'nope.jpg'}\n/image {notimg}\nHi there\n"
    rc, replies, err = chat(capsys, monkeypatch, env, script)
    _, plain, _ = chat(capsys, monkeypatch, env, "Hi there\n")
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 0 and len(errs) == 2 and "Traceback" not in err, err
    assert "nope.jpg not found" in errs[0] and "not a readable image" in errs[1]
    assert replies == plain  # the failed attachments left the conversation text-only
    # The same bad file given up front ends the command with one line.
    rc, _, err = chat(capsys, monkeypatch, env, "Hi\n", "--image", str(notimg))
    one_line_error(rc, err, "not a readable image")
    # A text-only adapter refuses images: up front (exit 2) and in the chat (one line, goes on).
    rc, _, err = chat(capsys, monkeypatch, env, "Hi\n", "--image", env["img1"], adapter="text")
    one_line_error(rc, err, "text-only")
    rc, replies, err = chat(capsys, monkeypatch, env, f"/image {env['img1']}\nHi there\n", adapter="text")
    assert rc == 0 and "text-only" in err and len(replies) == 1


def test_generate_image_errors_are_one_line(env, capsys, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00" * 100)
    base = ["generate", "--model", env["stories"], "--prompt", "Hi", *GEN]
    one_line_error(*cli(capsys, *base, "--adapter", env["mm"], "--image", bad)[::2], "not a readable image")
    one_line_error(*cli(capsys, *base, "--adapter", env["mm"], "--image", tmp_path / "no.png")[::2], "not found")
    one_line_error(*cli(capsys, *base, "--adapter", env["text"], "--image", env["img1"])[::2], "text-only")
    one_line_error(*cli(capsys, *base, "--image", env["img1"])[::2], "multimodal adapter")


# ---------------------------------------------------------------- encoder weights from the metadata


def test_encoder_weights_come_from_the_metadata(env, capsys, tmp_path):
    argv = ["generate", "--model", env["stories"], "--prompt", "Once upon a time", "--image", env["img1"], *GEN]
    rc, recorded, err = cli(capsys, *argv, "--adapter", env["mm"])
    assert rc == 0, err
    assert cli(capsys, *argv, "--adapter", env["mm"], "--image-encoder-weights", env["weights"])[1] == recorded
    rc, other, _ = cli(capsys, *argv, "--adapter", env["mm"], "--image-encoder-weights", env["other"])
    assert rc == 0 and other != recorded  # the flag overrides, and the weights do change the result
    # The run moved elsewhere with its checkpoint, recorded relative: found next to the adapter.
    moved = tmp_path / "moved"
    shutil.copytree(env["mm"], moved)
    shutil.copy(env["weights"], moved / "clip.safetensors")
    meta = json.loads((moved / "adapter_config.json").read_text())
    meta["image_encoder_weights"] = "clip.safetensors"
    (moved / "adapter_config.json").write_text(json.dumps(meta))
    assert encoder_weights(moved, meta) == str(moved / "clip.safetensors")
    assert cli(capsys, *argv, "--adapter", moved)[1] == recorded
    # Weights gone: one line naming the file and the flag; the flag still rescues the run.
    (moved / "clip.safetensors").unlink()
    one_line_error(*cli(capsys, *argv, "--adapter", moved)[::2], "clip.safetensors", "--image-encoder-weights")
    assert cli(capsys, *argv, "--adapter", moved, "--image-encoder-weights", env["weights"])[1] == recorded
    one_line_error(
        *cli(capsys, *argv, "--adapter", moved, "--image-encoder-weights", tmp_path / "x.pt")[::2], "x.pt not found"
    )
    # Text-only generation never needs the encoder checkpoint.
    assert cli(capsys, "generate", "--model", env["stories"], "--adapter", moved, "--prompt", "Hi", *GEN)[0] == 0
    # Train args are a fallback place for the path.
    meta.pop("image_encoder_weights")
    meta["train"] = {"image_encoder_weights": str(env["weights"])}
    assert encoder_weights(moved, meta) == str(env["weights"])
    assert encoder_weights(moved, {"adapter": {}}) is None  # packaged weights (EfficientNet-Lite0)


def test_evaluate_uses_the_recorded_encoder_weights(env, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"What is shown {i}?",
                    "choices": ["a dog", "a cat", "a car"],
                    "answer": i % 3,
                    "image": env[f"img{1 + i % 2}"],
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    kw = dict(model=env["stories"], task="mc", data=str(data), target="text", progress=False)
    recorded = run(EvalArgs(adapter=str(env["mm"]), **kw))
    explicit = run(EvalArgs(adapter=str(env["mm"]), image_encoder_weights=str(env["weights"]), **kw))
    other = run(EvalArgs(adapter=str(env["mm"]), image_encoder_weights=str(env["other"]), **kw))
    scores = [[p["scores"] for p in r["predictions"]] for r in (recorded, explicit, other)]
    assert recorded["images_used"] and scores[0] == scores[1] and scores[0] != scores[2]
    moved = tmp_path / "moved"
    shutil.copytree(env["mm"], moved)
    meta = json.loads((moved / "adapter_config.json").read_text())
    meta["image_encoder_weights"] = str(tmp_path / "gone.safetensors")
    (moved / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="gone.safetensors.*--image-encoder-weights"):
        run(EvalArgs(adapter=str(moved), **kw))


def test_clip_tiny_default_weights_differ_from_the_saved_ones(env):
    """Guards the tests above: the file's weights are not clip-tiny's built-in random ones."""
    a = load_image_encoder("clip-tiny", weights=env["weights"]).encode_images([env["img1"]])
    b = load_image_encoder("clip-tiny").encode_images([env["img1"]])
    assert (a - b).abs().max() > 1e-3
