"""Every modality everywhere: `ModalitySet` (what an adapter takes, saved beside it under the one
predicate), zero-init with any input, mixed batches through `Stack.batch_prompt`, and the front
ends: `generate --audio/--video/--points` (flags and JSONL), chat's /audio /video /points, and the
API's input_audio / input_video / input_points parts, with one-line errors / HTTP 400 for inputs a
model cannot take or files that are bad. Base: stories260K; encoder: clip-tiny (random, seeded)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import re
import wave

import numpy as np
import pytest
import torch
from helpers import modal_adapter, stories260k, tiny_llama
from PIL import Image
from safetensors.torch import load_file

from llama_adapter.adapter import ADAPTER_CONFIG, AdaptedLLaMA, AdapterConfig, is_adapter_param
from llama_adapter.cli import main
from llama_adapter.loading import input_prompt_state, load_stack
from llama_adapter.multimodal import (
    MODALITY_FILE,
    BindProjection,
    EmbeddingSpace,
    Input,
    ModalitySet,
    PointEncoder,
    read_input,
)
from llama_adapter.multimodal.shapes import random_shape, sample_cloud
from llama_adapter.multimodal.video import synthetic_clip, write_video

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_AUDIO = importlib.util.find_spec("aisfx") is not None and importlib.util.find_spec("miniaudio") is not None
needs_audio = pytest.mark.skipif(not HAS_AUDIO, reason="audio needs miniaudio + aisfx (scripts/setup.sh)")
GEN = ["--max-new-tokens", "10", "--temperature", "0"]


def write_wav(path, seconds: float = 0.6, hz: float = 440.0, rate: int = 22050):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * math.pi * hz * t) * 12000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_ply(path, cloud: torch.Tensor):
    a = cloud.numpy()
    head = f"ply\nformat ascii 1.0\nelement vertex {len(a)}\nproperty float x\nproperty float y\nproperty float z\n"
    head += "property float red\nproperty float green\nproperty float blue\nend_header\n"
    path.write_text(head + "".join(" ".join(f"{v:.4f}" for v in row) + "\n" for row in a))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("modal")
    model, _ = stories260k()
    np.save(d / "nan.npy", np.array([[0.0, 0.0, np.nan]] * 4))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 300)
    return {
        "dir": d,
        "all": modal_adapter(d / "all", model),
        "bind": modal_adapter(d / "bindad", model, bind=True, seed=1),
        "cloud": write_ply(d / "cone.ply", sample_cloud(random_shape(3), 300)[0]),
        "cloud2": write_ply(d / "other.ply", sample_cloud(random_shape(8), 300)[0]),
        "clip": write_video(synthetic_clip("circle", "red", 6, size=48, seed=1), d / "clip.gif"),
        "img": d / "img.png",
        "wav": write_wav(d / "tone.wav"),
        "nan": d / "nan.npy",
        "broken": d / "broken.mp4",
    }


# ------------------------------------------------------------------------------- ModalitySet


def test_modalities_are_saved_beside_the_adapter_under_the_one_predicate(env):
    meta = json.loads((env["all"] / ADAPTER_CONFIG).read_text())
    rec = meta["modalities"]
    assert rec["takes"] == ["image", "audio", "video", "points"] and rec["file"] == MODALITY_FILE
    assert rec["points"]["points"] == 64 and rec["audio"]["hidden"] == 16 and rec["image_encoder"] == "clip-tiny"
    sd = load_file(env["all"] / MODALITY_FILE)
    assert sd and all(is_adapter_param(k) for k in sd)
    assert {"adapter_space.mean", "adapter_space.std", "adapter_points.logit_scale"} <= set(sd)
    mods = ModalitySet.for_adapter(AdapterConfig(**meta["adapter"]), meta, env["all"])
    for k, v in mods.state_dict().items():
        assert torch.equal(v, sd[k])
    # trainable == saved: every parameter is under an adapter_* name and requires grad
    assert all(is_adapter_param(n) and p.requires_grad for n, p in mods.named_parameters())
    assert not mods.training


def test_what_an_adapter_takes_by_default():
    vis = AdapterConfig(adapter_len=2, adapter_layers=1, visual_dim=128, image_encoder="clip-tiny")
    assert ModalitySet.for_adapter(vis).modalities == ("image", "video")
    assert ModalitySet.for_adapter(AdapterConfig(adapter_len=2, adapter_layers=1)) is None
    assert ModalitySet.for_adapter(AdapterConfig(adapter_len=2, adapter_layers=1, bind_dim=8)) is None
    with pytest.raises(ValueError, match="images and video only"):
        ModalitySet("clip-tiny", 8, tokens=True, space=EmbeddingSpace(torch.zeros(8), torch.ones(8)),
                    points=PointEncoder(8, (4,), 4))  # fmt: skip
    with pytest.raises(ValueError, match="space"):
        ModalitySet("clip-tiny", 8, points=PointEncoder(8, (4,), 4))


def test_damaged_or_missing_modalities_file_is_one_line(env, tmp_path):
    import shutil

    d = shutil.copytree(env["all"], tmp_path / "a")
    (d / MODALITY_FILE).write_bytes((d / MODALITY_FILE).read_bytes()[:100])
    for damaged in (True, False):
        if not damaged:
            (d / MODALITY_FILE).unlink()
        with pytest.raises(ValueError, match=MODALITY_FILE) as e:
            assert load_stack("stories260k", str(d)).adapters["a"].takes
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("bind", [False, True])
def test_zero_init_every_modality_equals_the_frozen_model(env, bind):
    base = tiny_llama()
    idx = torch.randint(0, 61, (5, 7))
    with torch.no_grad():
        frozen = base(idx)
    torch.manual_seed(0)
    kw = {"bind_dim": 128} if bind else {"visual_dim": 128, "image_encoder": "clip-tiny"}
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2, **kw))  # untrained: gates 0
    mods = ModalitySet("clip-tiny", 128, space=EmbeddingSpace(torch.randn(128), torch.rand(128) + 0.5),
                       audio=BindProjection(512, 128, 16), points=PointEncoder(128, (8,), 8, points=32))  # fmt: skip
    inputs = [read_input("points", env["cloud"]), read_input("video", env["clip"]), read_input("image", env["img"]),
              None, read_input("audio", env["wav"]) if HAS_AUDIO else None]  # fmt: skip
    with torch.no_grad():
        st = input_prompt_state(model, inputs, modalities=mods)
        assert (st.bind if bind else st.layers[model.adapted_layers[0]].prompt).abs().sum() > 0  # inputs got in
        assert torch.equal(model(idx, ctx=st), frozen)


def test_mixed_batch_rows_equal_each_row_alone(env):
    for name in ("all", "bind"):
        # fp32 weights: 8-bit activations round differently when an input's encoder differs by 1e-7
        # between a batch and a single row, which is not what this test is about
        stack = load_stack("stories260k", {name: str(env[name])}, weights="fp32")
        a = stack.adapters[name]
        inputs = [read_input("points", env["cloud"]), None, read_input("video", env["clip"]),
                  read_input("image", env["img"]), read_input("points", env["cloud2"])]  # fmt: skip
        idx = torch.tensor([stack.tokenizer.encode("Once upon a time", bos=True)] * len(inputs))
        with torch.no_grad():
            batch = a.model(idx, ctx=stack.batch_prompt(name, inputs))
            for i, x in enumerate(inputs):
                alone = a.model(idx[:1], ctx=stack.row_prompt(name, x))
                torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(batch[0], batch[1]) and not torch.allclose(batch[0], batch[4])  # inputs matter


def test_a_modality_the_model_lacks_is_refused_naming_what_it_takes(env):
    stack = load_stack("stories260k", {"vis": str(env["all"])})
    stack.adapters["vis"]._modalities = ModalitySet("clip-tiny", 128)  # an image-only adapter
    with pytest.raises(ValueError, match=r"takes image, video \(besides text\), not points"):
        stack.batch_prompt("vis", [Input("points", torch.zeros(3, 6))])
    with pytest.raises(ValueError, match="frozen base model and takes text only, not audio"):
        stack.check_input(None, "audio")


# ------------------------------------------------------------------------------- CLI


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def outputs(out: str) -> list[str]:
    return [json.loads(line)["output"] for line in out.splitlines()]


def test_generate_mixes_modalities_in_one_batch(env, capsys, tmp_path):
    rows = [{"prompt": "Once upon a time", "points": str(env["cloud"])},
            {"prompt": "Once upon a time"},
            {"prompt": "Once upon a time", "video": str(env["clip"])},
            {"prompt": "Once upon a time", "image": str(env["img"])}]  # fmt: skip
    if HAS_AUDIO:
        rows.append({"prompt": "Once upon a time", "audio": str(env["wav"])})
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["generate", "--model", "stories260k", "--adapter", env["all"], *GEN]
    rc, out, err = cli(capsys, *base, "--batch", f)
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert recs[0]["points"] == str(env["cloud"]) and recs[0]["image"] is None and recs[3]["image"] == str(env["img"])
    mixed = [r["output"] for r in recs]
    assert all(m != mixed[1] for i, m in enumerate(mixed) if i != 1)  # every input changes the text
    # The same rows from flags: one flag of each kind per --prompt, 'none' where a row has no such input.
    argv = list(base)
    for r in rows:
        argv += ["--prompt", r["prompt"]]
        for m in ("image", "audio", "video", "points"):
            if HAS_AUDIO or m != "audio":
                argv += [f"--{m}", r.get(m, "none")]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert [chunk.split("\n", 1)[1].rstrip("\n") for chunk in out.split("--- ")[1:]] == mixed
    # ... and each row alone gives its batch row's text
    rc, alone, _ = cli(capsys, *base, "--prompt", "Once upon a time", "--points", env["cloud"])
    assert rc == 0 and alone.rstrip("\n") == mixed[0]


def test_generate_input_errors_are_one_line(env, capsys, tmp_path):
    base = ["generate", "--model", "stories260k", "--prompt", "Hi", *GEN]
    one_line_error(*cli(capsys, *base, "--adapter", env["all"], "--points", env["nan"])[::2], "NaN or Inf")
    one_line_error(*cli(capsys, *base, "--adapter", env["all"], "--video", env["broken"])[::2], "not a readable video")
    one_line_error(*cli(capsys, *base, "--adapter", env["all"], "--points", tmp_path / "no.ply")[::2], "not found")
    one_line_error(*cli(capsys, *base, "--points", env["cloud"])[::2], "takes text only", "multimodal adapter")
    one_line_error(*cli(capsys, *base, "--adapter", env["all"], "--image", env["img"], "--points", env["cloud"])[::2],
                   "at most one non-text input per row")  # fmt: skip
    argv = ["generate", "--model", "stories260k", "--prompt", "a", "--prompt", "b", "--video", env["clip"]]
    one_line_error(*cli(capsys, *argv, "--video", "none", "--video", "none")[::2], "3 --video for 2 --prompt")


def chat(capsys, monkeypatch, stdin: str, *argv) -> tuple[int, list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc, out, err = cli(capsys, "chat", "--model", "stories260k", *GEN, "--stop", "\n", *argv)
    replies = [re.sub(r"^(> )+", "", ln) for ln in out.split("\n")]  # one "> " per input line
    return rc, [r for r in replies if r.strip()], err


def test_chat_attaches_any_modality(env, capsys, monkeypatch):
    script = (f"/points {env['cloud']}\nHi\n/video {env['clip']}\nHi\n/points none\nHi\n/video {env['broken']}\n"
              f"/points {env['nan']}\nHi\n")  # fmt: skip
    rc, replies, err = chat(capsys, monkeypatch, script, "--adapter", env["all"])
    assert rc == 0 and "points attached" in err and "video attached" in err and "video detached" in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 2  # both bad files, one line each
    assert len(replies) == 4
    rc, flagged, _ = chat(capsys, monkeypatch, "Hi\n", "--adapter", env["all"], "--points", env["cloud"])
    rc, plain, _ = chat(capsys, monkeypatch, "Hi\n", "--adapter", env["all"])
    assert rc == 0 and flagged == replies[:1] and plain != flagged
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    one_line_error(*cli(capsys, "chat", "--model", "stories260k", "--audio", env["wav"], *GEN)[::2], "text only")


# ------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def client(env):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llama_adapter.serve import Scheduler, build_app

    stack = load_stack("stories260k", {"all": str(env["all"])})
    with TestClient(build_app(Scheduler(stack, max_batch=4))) as c:
        yield c


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ask(client, part: dict | None, model: str = "all"):
    content = [{"type": "text", "text": "Once upon a time"}] + ([part] if part else [])
    body = {"model": model, "max_tokens": 10, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    return client.post("/v1/chat/completions", json=body)


def test_api_takes_audio_video_and_points_parts(env, client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert (
        models["all"]["modalities"] == ["image", "audio", "video", "points"]
        and models["stories260k"]["modalities"] == []
    )
    texts = {}
    parts = {"points": {"type": "input_points", "input_points": {"data": b64(env["cloud"]), "format": "ply"}},
             "video": {"type": "input_video", "input_video": {"data": b64(env["clip"]), "format": "gif"}},
             "none": None}  # fmt: skip
    if HAS_AUDIO:
        parts["audio"] = {"type": "input_audio", "input_audio": {"data": b64(env["wav"]), "format": "wav"}}
    for k, part in parts.items():
        r = ask(client, part)
        assert r.status_code == 200, r.text
        texts[k] = r.json()["choices"][0]["message"]["content"]
    assert len(set(texts.values())) == len(texts)  # each input reaches the prompts
    # the same cloud from the CLI gives the same text as the API
    r = ask(client, parts["points"])
    assert r.json()["choices"][0]["message"]["content"] == texts["points"]


def test_api_refuses_bad_or_unsupported_inputs_with_400(env, client):
    part = {"type": "input_points", "input_points": {"data": b64(env["cloud"]), "format": "ply"}}
    r = ask(client, part, model="stories260k")
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "points_not_supported" and "takes text only" in err["message"]
    bad = {
        "nan": {"type": "input_points", "input_points": {"data": b64(env["nan"]), "format": "npy"}},
        "broken video": {"type": "input_video", "input_video": {"data": b64(env["broken"]), "format": "mp4"}},
        "base64": {"type": "input_points", "input_points": {"data": "!!!", "format": "ply"}},
        "format": {"type": "input_video", "input_video": {"data": b64(env["clip"]), "format": "flv"}},
        "shape": {"type": "input_audio", "input_audio": "not an object"},
        "garbage audio": {"type": "input_audio", "input_audio": {"data": b64(env["img"]), "format": "mp3"}},
    }
    for name, p in bad.items():
        r = ask(client, p)
        assert r.status_code == 400, (name, r.text)
        assert "\n" not in r.json()["error"]["message"]
    two = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(env["img"])}}
    body = {"model": "all", "messages": [{"role": "user", "content": [two, bad["nan"]]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "at most one non-text input" in r.json()["error"]["message"]
    assert client.get("/health").json()["errors"] == 0  # refused before reaching the engine
