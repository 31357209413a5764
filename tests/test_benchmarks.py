"""The OCR (TextVQA-style) and MME-style benchmarks: seeded generators that write the same bytes
every run, splits disjoint by photo and by word, the VQA and MME scoring rules, one-line errors for
bad benchmark files, and `data make-*` + `evaluate --task ocr/mme` end to end on stories260K with
random multimodal adapters (clip-tiny: a smoke test of the CLIP path, not a result)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FLICKR
from PIL import Image

from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig, save_adapter
from llama_adapter.checkpoint import load_model
from llama_adapter.cli import main
from llama_adapter.evaluate import EvalArgs, as_stack, load_bench, make_mme, make_ocr, run, synth
from llama_adapter.evaluate.ocr import vocabulary
from llama_adapter.evaluate.words import WORDS
from llama_adapter.metrics import mme_scores, mme_yes_no, normalize_vqa_answer, vqa_accuracy
from llama_adapter.multimodal import load_image_encoder, load_image_examples
from llama_adapter.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTOS = FLICKR / "images"


@pytest.fixture(scope="module")
def photos() -> Path:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} not found")
    return PHOTOS


@pytest.fixture(scope="module")
def sets(tmp_path_factory, photos) -> dict[str, Path]:
    """Tiny OCR and MME sets (12 and 8 images), generated once for the module."""
    d = tmp_path_factory.mktemp("bench")
    ocr = make_ocr(d / "ocr", n_train=6, n_test=6, seed=3, photos=photos, progress=False)
    mme = make_mme(d / "mme", n_train=3, n_test=5, seed=3, photos=photos, progress=False)
    return {"ocr": ocr["test"], "ocr_train": ocr["train"], "mme": mme["test"], "dir": d}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ generators
def test_same_seed_same_bytes(tmp_path, photos, sets):
    again = make_ocr(tmp_path / "ocr", n_train=6, n_test=6, seed=3, photos=photos, progress=False)
    assert tree_bytes(again["test"].parent) == tree_bytes(sets["ocr"].parent)
    mme = make_mme(tmp_path / "mme", n_train=3, n_test=5, seed=3, photos=photos, progress=False)
    assert tree_bytes(mme["test"].parent) == tree_bytes(sets["mme"].parent)
    # Re-running into its own folder replaces it; another seed draws other items.
    other = make_ocr(tmp_path / "ocr", n_train=2, n_test=2, seed=4, photos=photos, progress=False)
    assert len(list((tmp_path / "ocr" / "images").iterdir())) == 4
    assert rows(other["test"]) != rows(sets["ocr"])[:2]
    # The first items of a split do not depend on how many are drawn.
    short = make_mme(tmp_path / "mme2", n_train=0, n_test=2, seed=3, photos=photos, progress=False)
    assert rows(short["test"]) == rows(sets["mme"])[:4]


def test_refuses_a_foreign_folder(tmp_path, photos):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and was not written by"):
        make_ocr(tmp_path, n_train=1, n_test=1, photos=photos, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="not both 0"):
        make_mme(tmp_path / "x", n_train=0, n_test=0, photos=photos, progress=False)


def test_splits_disjoint_by_photo_and_word(photos, sets):
    train_v, test_v = vocabulary(False), vocabulary(True)
    for kind in ("word", "number"):
        assert train_v[kind] and test_v[kind] and not set(train_v[kind]) & set(test_v[kind])
    pools = synth.split_photos(synth.find_photos(photos))
    assert not {p.name for p in pools["train"]} & {p.name for p in pools["test"]}
    train, test = rows(sets["ocr_train"]), rows(sets["ocr"])
    assert not {r["photo"] for r in train} & {r["photo"] for r in test}
    assert not {r["output"] for r in train} & {r["output"] for r in test}
    assert all(r["output"] in test_v[r["subtask"]] for r in test)
    # Every vocabulary word survives the VQA normalisation: a word read right always scores.
    assert all(normalize_vqa_answer(w) == w for w in WORDS)


def test_ocr_rows_and_control_images(sets):
    root = sets["ocr"].parent
    for r in rows(sets["ocr"]):
        assert r["answers"] == [r["output"]] and r["subtask"] in ("word", "number")
        assert r["instruction"].endswith("?" + " Answer with one word.")
        control = np.asarray(Image.open(root / r["control_image"]).convert("L"), dtype=np.float32)
        image = np.asarray(Image.open(root / r["image"]).convert("L"), dtype=np.float32)
        assert control.shape == image.shape == (256, 256)
        # The control is the photo without the text: they differ only inside the drawn box.
        diff = np.abs(control - image)
        x0, y0, x1, y1 = r["box"]
        outside = np.ones_like(diff, dtype=bool)
        outside[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False
        assert diff.max() > 40 and diff[outside].mean() < 3
    # The same JSONL trains an adapter: the image-text reader takes it as is.
    assert len(load_image_examples(sets["ocr_train"])) == 6


def test_mme_rows_pair_a_yes_and_a_no(sets):
    got = rows(sets["mme"])
    assert len(got) == 10 and [r["subtask"] for r in got[::2]] == ["existence", "count", "position", "color", "ocr"]
    for yes, no in zip(got[::2], got[1::2]):
        assert (yes["answer"], no["answer"]) == ("yes", "no") and yes["image"] == no["image"]
        assert yes["pair"] == no["pair"] and yes["instruction"] != no["instruction"]
        assert yes["instruction"].endswith("? Please answer yes or no.")


# --------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    "text, want",
    [
        ("Apple", "apple"),
        ("  The apple. ", "apple"),
        ("an Apple!", "apple"),
        ("Two", "2"),
        ("none", "0"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("x-ray", "x ray"),
        ("dont", "don't"),
        ("yes, it is", "yes it is"),
        ("a\tb\nc", "b c"),
    ],
)
def test_vqa_normalisation(text, want):
    assert normalize_vqa_answer(text) == want


def test_vqa_accuracy_rule():
    assert vqa_accuracy(" Lantern.", ["lantern"]) == 1.0
    assert vqa_accuracy("The lantern", ["lantern"]) == 1.0
    assert vqa_accuracy("lanterns", ["lantern"]) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0
    # Ten human answers: min(1, matches among the other nine / 3), averaged over the ten.
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_mme_parsing_and_scores_by_hand():
    assert [mme_yes_no(t) for t in ("Yes", " no.", "Yes, there is", "Nope", "maybe", "")] == [
        "yes",
        "no",
        "yes",
        "no",
        "other",
        "other",
    ]
    recs = [  # color: image a both right, image b one right; count: image c both wrong
        {"subtask": "color", "image": "a", "correct": True},
        {"subtask": "color", "image": "a", "correct": True},
        {"subtask": "color", "image": "b", "correct": True},
        {"subtask": "color", "image": "b", "correct": False},
        {"subtask": "count", "image": "c", "correct": False},
        {"subtask": "count", "image": "c", "correct": False},
    ]
    s = mme_scores(recs)
    assert s["color"] == {"questions": 4, "images": 2, "acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert s["count"]["score"] == 0.0 and list(s) == ["color", "count"]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_benchmark_lines(tmp_path, sets):
    good = rows(sets["mme"])[0]
    good["image"] = str(sets["mme"].parent / good["image"])
    bad = {
        2: ({**good, "image": "nope.jpg"}, "nope.jpg not found"),
        3: ({**good, "answers": "yes"}, "'answers' must be a non-empty list of strings, got str"),
        4: ({**good, "subtask": "colour"}, "unknown subtask 'colour'"),
        5: ("{broken", "invalid JSON"),
        6: ({**good, "answer": "maybe"}, "an MME answer is 'yes' or 'no'"),
    }
    for lineno, (row, msg) in bad.items():
        f = tmp_path / f"bad{lineno}.jsonl"
        lines = [json.dumps(good)] * (lineno - 1) + [row if isinstance(row, str) else json.dumps(row)]
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"bad{lineno}\.jsonl:{lineno}: .*{msg}") as e:
            load_bench(f, "mme")
        assert "\n" not in str(e.value)
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([json.dumps(good), *(r if isinstance(r, str) else json.dumps(r) for r, _ in bad.values())]))
    data = load_bench(f, "mme", skip_bad=True)
    assert len(data.items) == 1 and [s["where"].rsplit(":", 1)[1] for s in data.skipped] == ["2", "3", "4", "5", "6"]
    assert "do not have one yes and one no" in data.notes[0]
    ocr = rows(sets["ocr"])[0]
    ocr["image"] = str(sets["ocr"].parent / ocr["image"])
    f.write_text(json.dumps({**ocr, "control_image": "gone.jpg"}) + "\n")
    with pytest.raises(ValueError, match=r"mixed\.jsonl:1: image .*gone\.jpg not found"):
        load_bench(f, "ocr")


# ------------------------------------------------------------------------------------------ end to end
def visual_config(encoder: str, variant: str) -> dict:
    enc = load_image_encoder(encoder)
    if variant == "query":  # V2 visual-query blocks over the encoder's patch tokens
        n, d = enc.token_shape
        return dict(visual_query_blocks=1, visual_tokens=n, visual_token_dim=d, visual_dim=n * d)
    extra = {"visual_layers": 2} if variant == "early" else {}  # V2 early fusion
    return dict(visual_dim=enc.feature_dim, **extra)


def random_adapter(stories: Path, encoder: str = "clip-tiny", variant: str = "v1") -> AdaptedLLaMA:
    torch.manual_seed(0)
    cfg = AdapterConfig(adapter_len=4, adapter_layers=4, image_encoder=encoder, **visual_config(encoder, variant))
    model = AdaptedLLaMA(load_model(stories), cfg)
    with torch.no_grad():  # open gates, so the image changes what is generated
        model.adapter.gates.fill_(1.0)
    return model.eval()


VARIANTS = [("clip-tiny", "v1"), ("clip-tiny", "early"), ("clip-tiny", "query"), ("efficientnet-lite0", "v1")]


@pytest.mark.parametrize("encoder, variant", VARIANTS)
def test_every_adapter_variant_runs_both_benchmarks(sets, stories260k, encoder, variant):
    model = random_adapter(stories260k, encoder, variant)
    stack = as_stack(model, load_tokenizer(model.model.config.extra["tokenizer"]), {"template": "plain"})
    kw = dict(model=str(stories260k), template="plain", max_new_tokens=3, batch_size=4, progress=False, limit=4)
    ocr = run(EvalArgs(task="ocr", data=str(sets["ocr"]), **kw), stack)
    assert ocr["images_used"] and ocr["image_encoder"] == encoder and ocr["n"] == 4
    assert ocr["control_accuracy"] is not None and all("control_output" in p for p in ocr["predictions"])
    mme = run(EvalArgs(task="mme", data=str(sets["mme"]), **kw), stack)
    assert mme["n"] == 4 and set(mme["subtasks"]) == {"existence", "count"} and mme["max_score"] == 400


def test_cli_data_and_evaluate(tmp_path, capsys, photos, stories260k):
    ocr_dir, mme_dir = tmp_path / "ocr", tmp_path / "mme"
    assert main(["data", "make-ocr", "--out", str(ocr_dir), "--n-train", "1", "--n-test", "3", "--photos", str(photos),
                 "--seed", "5", "--no-progress"]) == 0  # fmt: skip
    assert "test: " in capsys.readouterr().out and (ocr_dir / "meta.json").is_file()
    assert main(["data", "make-mme", "--out", str(mme_dir), "--n-train", "0", "--n-test", "2", "--photos", str(photos),
                 "--no-progress"]) == 0  # fmt: skip
    assert "(4 questions)" in capsys.readouterr().out

    adapter = tmp_path / "adapter"
    save_adapter(random_adapter(stories260k), adapter, metadata={"template": "plain"})
    common = ["--model", str(stories260k), "--max-new-tokens", "3", "--no-progress"]
    report = tmp_path / "ocr.json"
    ocr_test = str(ocr_dir / "test.jsonl")
    assert main(["evaluate", "--task", "ocr", "--data", ocr_test, "--adapter", str(adapter), "--report", str(report),
                 *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "images used: yes (clip-tiny)" in out and "no-text %" in out and "word" in out
    rep = json.loads(report.read_text())
    assert rep["task"] == "ocr" and rep["n"] == 3 and rep["control_accuracy"] is not None

    assert main(["evaluate", "--task", "mme", "--data", str(mme_dir / "test.jsonl"), "--adapter", str(adapter),
                 *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "total perception score" in out and "existence" in out and "count" in out

    # A folder instead of the file: one line that names the file to give.
    assert main(["evaluate", "--task", "ocr", "--data", str(ocr_dir), *common]) == 2
    assert "is a folder; give the data file itself (e.g." in capsys.readouterr().err

    # Text-only (the base model): allowed, and the table says what the numbers mean.
    assert main(["evaluate", "--task", "ocr", "--data", ocr_test, *common]) == 0
    assert "text prior" in capsys.readouterr().out

    # A bad line: one error line naming file:line; --skip-bad counts it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text((ocr_dir / "test.jsonl").read_text().replace('"subtask": "word"', '"subtask": "words"', 1))
    bad_line = next(i for i, r in enumerate(rows(bad), 1) if r["subtask"] == "words")
    (tmp_path / "images").symlink_to(ocr_dir / "images")
    (tmp_path / "controls").symlink_to(ocr_dir / "controls")
    assert main(["evaluate", "--task", "ocr", "--data", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:{bad_line}: unknown subtask 'words'" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--task", "ocr", "--data", str(bad), "--skip-bad", *common]) == 0
    assert "skipped bad items: 1" in capsys.readouterr().out
