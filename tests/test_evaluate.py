import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED, STORIES, tiny_llama

from llama_adapter import evaluate as ev
from llama_adapter.adapter import AdaptedLLaMA, AdapterConfig
from llama_adapter.data import encode_example
from llama_adapter.evaluate import (
    EvalArgs,
    MCItem,
    as_stack,
    eval_loss,
    eval_mc,
    format_table,
    load_mc_jsonl,
    load_scienceqa,
    mc_prompt,
    parse_answer,
    score_batch,
    split_continuation,
)
from llama_adapter.evaluate import mc as mc_scoring
from llama_adapter.model import LLaMA
from llama_adapter.tokenizer import load_tokenizer

TOK = SHARED / "llama2c" / "tok512.bin"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


def tiny_model(seed: int = 0, tie: bool = True) -> LLaMA:
    return tiny_llama(seed, n_layers=2, vocab_size=512, hidden_dim=64, max_seq_len=512, tie_embeddings=tie, std=0.2)


def forced_model(target: int) -> LLaMA:
    """Every position predicts `target` with high probability: a constant residual channel that only
    the output row of `target` reads."""
    m = tiny_model(tie=False)
    with torch.no_grad():
        m.tok_embeddings.weight[:, 0] = 50.0
        for layer in m.layers:
            layer.attention.wo.weight[0] = 0
            layer.feed_forward.w2.weight[0] = 0
        m.norm.weight.zero_()
        m.norm.weight[0] = 1.0
        m.output.weight.zero_()
        m.output.weight[target, 0] = 3.0
    return m


def item(**kw) -> MCItem:
    base = dict(id="q", question="Which one is a colour?", choices=["dog", "red", "car"], answer=1)
    base.update(kw)
    return MCItem(**base)


# ------------------------------------------------------------------------------------------- ScienceQA
def write_scienceqa(root: Path, with_image_file: bool = True) -> Path:
    def prob(q, choices, answer, hint="", image=None, split="val", subject="natural science", grade="grade3"):
        return {
            "question": q,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": image,
            "task": "closed choice",
            "grade": grade,
            "subject": subject,
            "topic": "t",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
            "split": split,
        }

    problems = {
        "1": prob("Which is a mammal?", ["frog", "whale"], 1, hint="Whales breathe air."),
        "2": prob("Which word is a noun?", ["run", "table", "quickly"], 1, subject="language science", grade="grade8"),
        "3": prob("Which state is highlighted?", ["Ohio", "Texas"], 0, image="image.png", subject="social science"),
        "4": prob("Train question?", ["a", "b"], 0, split="train"),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["4"], "val": ["1", "2", "3"], "test": []}))
    if with_image_file:
        (root / "images" / "val" / "3").mkdir(parents=True)
        (root / "images" / "val" / "3" / "image.png").write_bytes(b"png")
    return root


def test_scienceqa_loader_and_paper_prompt(tmp_path):
    root = write_scienceqa(tmp_path / "sqa")
    data = load_scienceqa(root, "val")
    assert [it.id for it in data.items] == ["1", "2", "3"]
    a, b, c = data.items
    assert a.answer == 1 and a.context == "Whales breathe air." and a.image is None
    assert b.meta == {"subject": "language science", "context": "NO", "grade": "G7-12"}
    assert c.meta["context"] == "IMG" and c.image is None  # no images folder: text-only, and said so
    assert "not used" in data.notes[0]
    assert mc_prompt(a, "plain") == (
        "Question: Which is a mammal?\nContext: Whales breathe air.\nOptions: (A) frog (B) whale\nAnswer: The answer is"
    )
    assert "Context: N/A" in mc_prompt(b)
    assert mc_prompt(a, "alpaca").endswith("### Response:\nThe answer is")
    with_images = load_scienceqa(root / "problems.json", "val", images=root / "images")
    assert with_images.items[2].image == str(root / "images" / "val" / "3" / "image.png")
    assert len(load_scienceqa(root, "train").items) == 1
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_scienceqa(root, "dev")


def test_scienceqa_missing_image_and_bad_answer(tmp_path):
    root = write_scienceqa(tmp_path / "sqa", with_image_file=False)
    with pytest.raises(ValueError, match=r"pid 3: image .*image.png not found"):
        load_scienceqa(root, "val", images=root / "images")
    data = load_scienceqa(root, "val", images=root / "images", skip_bad=True)
    assert len(data.items) == 2 and len(data.skipped) == 1 and "pid 3" in data.skipped[0]["where"]
    probs = json.loads((root / "problems.json").read_text())
    probs["2"]["answer"] = 7
    (root / "problems.json").write_text(json.dumps(probs))
    with pytest.raises(ValueError, match=r"pid 2: answer index 7 out of range for 3 choices"):
        load_scienceqa(root, "val")


# ----------------------------------------------------------------------------------------------- JSONL
def test_jsonl_answers_and_bad_lines(tmp_path):
    (tmp_path / "img.png").write_bytes(b"x")
    good = [
        {"question": "q1", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "q2", "choices": ["x", "y"], "answer": "B"},
        {"question": "q3", "choices": ["cat", "dog"], "answer": "dog", "image": "img.png"},
    ]
    p = tmp_path / "mc.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in good) + "\n")
    data = load_mc_jsonl(p)
    assert [it.answer for it in data.items] == [2, 1, 1]
    assert data.items[2].image == str(tmp_path / "img.png")

    bad = {
        2: ({"question": "q", "choices": ["a", "b"], "answer": 5}, "answer index 5 out of range"),
        3: ({"question": "q", "choices": [], "answer": 0}, "'choices' is empty"),
        4: ({"question": "q", "choices": ["a", "b"], "answer": 0, "image": "nope.png"}, "nope.png not found"),
        5: ({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "letter 'Z' out of range"),
    }
    for lineno, (row, msg) in bad.items():
        lines = [json.dumps(good[0])] * (lineno - 1) + [json.dumps(row), json.dumps(good[1])]
        f = tmp_path / f"bad{lineno}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"bad{lineno}\.jsonl:{lineno}: .*{msg}"):
            load_mc_jsonl(f)
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join([json.dumps(good[0]), "{not json", *(json.dumps(r) for r, _ in bad.values())]) + "\n")
    data = load_mc_jsonl(f, skip_bad=True)
    assert len(data.items) == 1
    assert [s["where"].rsplit(":", 1)[1] for s in data.skipped] == ["2", "3", "4", "5", "6"]


# -------------------------------------------------------------------------------------------- scoring
def reference_logprob(model: LLaMA, prompt: list[int], option: list[int]) -> float:
    ids = torch.tensor([prompt + option])
    logp = torch.log_softmax(model(ids)[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(option))


def test_batched_scores_match_brute_force(tok):
    model = tiny_model()
    items = [item(), item(question="Pick a letter", choices=["alpha", "beta gamma delta", "e"], answer=0)]
    qs = []
    for it in items:
        text = mc_prompt(it)
        for target in ("letter", "text"):
            qs.append([split_continuation(tok, text, c) for c in ev.continuations(it, target)])
    # Also a question whose options are one token each after a shared prompt (the one-row path).
    p = tok.encode("Once upon a time", bos=True)
    qs.append([(p, [t]) for t in (5, 17, 300)])
    with torch.no_grad():
        got = score_batch(model, qs, tok.pad_id)
        for q, scores in zip(qs, got):
            want = [reference_logprob(model, list(pp), list(o)) for pp, o in q]
            assert scores == pytest.approx(want, abs=1e-4)


def test_single_token_options_share_a_row_beside_longer_ones(tok):
    """Eight colours of which one is two tokens: two rows (not eight), the same scores."""
    model = tiny_model()
    p = tok.encode("Question: what colour?\nAnswer: The answer is", bos=True)
    q = [(p, [t]) for t in (5, 17, 300, 41, 42, 43, 44)] + [(p, [17, 9])]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[0]), with_kwargs=True)
    with torch.no_grad():
        got = score_batch(model, [q, [(p, [5]), (p, [6])]], tok.pad_id)
    hook.remove()
    assert seen == [3]  # 2 rows for the first question, 1 for the second
    with torch.no_grad():
        want = [reference_logprob(model, list(pp), list(o)) for pp, o in q]
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_loglik_picks_the_forced_answer(tok):
    text = mc_prompt(item())
    target = split_continuation(tok, text, " B")[1]
    assert len(target) == 1
    model = forced_model(target[0])
    res = eval_mc(model, tok, [item(), item(answer=0)], template="plain", batch_size=2)
    assert [p["pred"] for p in res["predictions"]] == [1, 1]
    assert res["correct"] == 1 and res["accuracy"] == 0.5
    s = res["predictions"][0]["scores"]
    assert s[1] > max(s[0], s[2]) + 5


def test_mean_norm_changes_long_option_ranking(tok):
    # " B" forced: in text mode an option made of many B-tokens has a worse sum but the best mean.
    text = "Question: pick\nAnswer: The answer is"
    b = split_continuation(tok, text, " B")[1][0]
    model = forced_model(b)
    p = tok.encode(text, bos=True)
    sums = score_batch(model, [[(p, [b, b, b]), (p, [b]), (p, [7])]], tok.pad_id)[0]
    assert sums[1] > sums[0] and sums[0] / 3 == pytest.approx(sums[1], abs=1e-3) and sums[1] > sums[2]


def test_adapted_model_and_batch_size_do_not_change_scores(tok):
    base = tiny_model(seed=1)
    model = AdaptedLLaMA(base, AdapterConfig(adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        model.adapter.gates.fill_(0.5)
    model.eval()
    items = [item(answer=i % 3, question=f"Question number {i}?") for i in range(5)]
    a = eval_mc(model, tok, items, batch_size=1, target="text")
    b = eval_mc(model, tok, items, batch_size=5, target="text")
    for x, y in zip(a["predictions"], b["predictions"]):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-3)


# ------------------------------------------------------------------------------------ generate + parse
def test_parse_answer():
    ch = ["circle", "red", "no"]
    assert parse_answer(" B.", ch) == 1
    assert parse_answer(" (C) no", ch) == 2
    assert parse_answer("I think the answer is (A).", ch) == 0
    assert parse_answer(" red, definitely", ch) == 1
    assert parse_answer(" D", ch) is None
    assert parse_answer(" nothing useful", ch) is None


def test_generate_method_parses_outputs(tok, monkeypatch):
    outs = iter([[" B.", " (A) dog", " no idea"]])
    monkeypatch.setattr(mc_scoring, "greedy_answers", lambda model, tok, texts, n, ctx: next(outs))
    items = [item(), item(answer=0), item(answer=2)]
    res = eval_mc(tiny_model(), tok, items, method="generate", batch_size=3)
    assert [p["pred"] for p in res["predictions"]] == [1, 0, None]
    assert res["correct"] == 2 and res["unparsed"] == 1


def test_generate_method_with_real_decoder(tok):
    pytest.importorskip("llama_adapter.generate")
    res = eval_mc(tiny_model(), tok, [item(), item(answer=0)], method="generate", max_new_tokens=4, batch_size=2)
    assert res["n"] == 2 and all("output" in p for p in res["predictions"])


# ------------------------------------------------------------------------------------------------- loss
def test_perplexity_is_exp_of_direct_loss(tok):
    model = tiny_model()
    examples = [
        {"instruction": "Say hi.", "input": "", "output": "Hi there, friend."},
        {"instruction": "Count.", "input": "to three", "output": "One, two, three."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    rep = eval_loss(model, tok, examples, template="alpaca", batch_size=2)
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            enc = encode_example(ex, tok, "alpaca", 512)
            logits = model(torch.tensor([enc.input_ids]))[0, :-1]
            labels = torch.tensor(enc.labels[1:])
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            n += int(keep.sum())
    assert rep["n_tokens"] == n and rep["n_examples"] == 3
    assert rep["loss"] == pytest.approx(total / n, rel=1e-5)
    assert rep["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)


# --------------------------------------------------------------------------------------- run + report
def test_run_writes_report_and_table(tmp_path, tok):
    root = write_scienceqa(tmp_path / "sqa", with_image_file=False)
    out = tmp_path / "r.json"
    args = EvalArgs(
        task="mc",
        data=str(root),
        images=str(root / "images"),
        skip_bad=True,
        report=str(out),
        template="plain",
        progress=False,
        batch_size=2,
    )
    rep = ev.run(args, as_stack(tiny_model(), tok))
    saved = json.loads(out.read_text())
    assert saved["n"] == 2 and saved["n_skipped"] == 1 and saved["format"] == "scienceqa"
    assert set(saved["groups"]) == {"subject", "context", "grade"}
    table = format_table(rep)
    assert "skipped bad items: 1" in table and "pid 3" in table and "accuracy" in table
    assert len(table.splitlines()) < 25

    data = tmp_path / "val.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    rep = ev.run(EvalArgs(task="loss", data=str(data), template="alpaca", progress=False), as_stack(tiny_model(), tok))
    assert rep["perplexity"] == pytest.approx(math.exp(rep["loss"]))
    assert "perplexity" in format_table(rep)
    with pytest.raises(ValueError, match="--task loss reads instruction data"):
        ev.run(EvalArgs(task="loss", data=str(root), format="scienceqa"), as_stack(tiny_model(), tok))


def test_easyvqa_items():
    pytest.importorskip("easy_vqa")
    data = ev.load_easyvqa("test", candidates="kind", limit=20)
    assert len(data.items) == 20
    for it in data.items:
        assert Path(it.image).is_file() and it.choices[it.answer]
        assert it.meta["kind"] in ("yes/no", "shape", "color")
    assert ev.load_easyvqa("test", candidates="all", limit=1).items[0].choices.__len__() == 13


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_evaluate_mc_and_loss(tmp_path, capsys):
    pytest.importorskip("llama_adapter.checkpoint")
    from llama_adapter.cli import main

    p = tmp_path / "mc.jsonl"
    rows = [
        {"question": "Who went to the park?", "choices": ["Lily", "the moon"], "answer": 0},
        {"question": "q", "choices": ["a", "b"], "answer": 9},
        {"question": "What did Tom eat?", "choices": ["an apple", "a car", "a cloud"], "answer": "A"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["evaluate", "--model", str(STORIES), "--task", "mc", "--data", str(p), "--no-progress"]) == 2
    assert f"{p}:2: answer index 9 out of range" in capsys.readouterr().err
    report = tmp_path / "r.json"
    argv = [
        "evaluate",
        "--model",
        str(STORIES),
        "--task",
        "mc",
        "--data",
        str(p),
        "--skip-bad",
        "--target",
        "text",
        "--norm",
        "mean",
        "--report",
        str(report),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["n"] == 2 and rep["n_skipped"] == 1 and "skipped bad items: 1" in out
    assert main(argv[:8] + ["--method", "generate", "--no-progress"]) == 0
    assert "unparsed answers" in capsys.readouterr().out

    data = tmp_path / "val.json"
    data.write_text(json.dumps([{"instruction": "Tell a story.", "input": "", "output": "Once upon a time."}]))
    assert main(["evaluate", "--model", str(STORIES), "--task", "loss", "--data", str(data), "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
