"""Running the OCR and MME benchmarks: short greedy answers through the decode engine, batched,
each row with its own image prompt (`prompts(images)`, the runner's `Stack.batch_prompt`, so every
encoder and adapter variant is served the same way), then scored as the benchmarks score:

- OCR: VQA accuracy (`metrics.vqa_accuracy`) per subtask (word / number) and per drawn attribute
  (contrast style, font size), next to the same questions asked about the no-text control photo;
- MME: yes/no parsed as MME parses it, accuracy and accuracy+ per subtask, score = acc + acc+
  (at most 200 per subtask), and the perception total.

A text-only model (no adapter, or one trained without images) answers from the question alone:
the scores are then its text prior, and the table says so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from ..metrics import mme_scores, mme_yes_no, vqa_accuracy
from ..tokenizer import render_chat
from .bench_data import GROUP_KEYS, BenchItem
from .items import bar
from .model_io import Prompts, greedy_answers


def question_prompt(question: str, template: str) -> str:
    """A question as the user turn, rendered exactly as `finetune` renders an instruction."""
    return render_chat([{"role": "user", "content": question}], template, add_generation_prompt=True)


def _answer_all(
    model: torch.nn.Module,
    tok: Any,
    jobs: list[tuple[str, str | None]],
    *,
    prompts: Prompts | None,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    desc: str,
) -> list[str]:
    """Answers for (prompt text, image or None) jobs, `batch_size` rows per engine run."""
    out: list[str] = []
    progress_bar = bar(len(jobs), desc, progress)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        ctx = prompts([im for _, im in chunk]) if prompts is not None else None
        out += greedy_answers(model, tok, [t for t, _ in chunk], max_new_tokens, ctx)
        progress_bar.update(len(chunk))
    progress_bar.close()
    return out


def eval_bench(
    model: torch.nn.Module,
    tok: Any,
    items: Sequence[BenchItem],
    *,
    task: str,
    template: str = "plain",
    prompts: Prompts | None = None,
    controls: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer every question (and, for OCR with images and `controls`, the same question about the
    item's no-text control photo) and score the answers. `prompts(images)` gives a batch's prompt
    state; None means a text-only model: images are not used."""
    texts = [question_prompt(it.question, template) for it in items]
    jobs = [(t, it.image if prompts is not None else None) for t, it in zip(texts, items)]
    with_control = [i for i, it in enumerate(items) if task == "ocr" and controls and prompts and it.control]
    jobs += [(texts[i], items[i].control) for i in with_control]
    opts = {"prompts": prompts, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "progress": progress}
    answers = _answer_all(model, tok, jobs, desc=task, **opts)
    control = dict(zip(with_control, answers[len(items) :]))
    if task == "ocr":
        return summarize_ocr([_ocr_record(it, answers[i], control.get(i)) for i, it in enumerate(items)])
    return summarize_mme([_mme_record(it, answers[i]) for i, it in enumerate(items)])


def _ocr_record(it: BenchItem, output: str, control: str | None) -> dict[str, Any]:
    rec = {"id": it.id, "subtask": it.subtask, "answers": it.answers, "output": output}
    rec["score"] = vqa_accuracy(output, it.answers)
    if control is not None:
        rec["control_output"], rec["control_score"] = control, vqa_accuracy(control, it.answers)
    return {**rec, **it.meta}


def _mme_record(it: BenchItem, output: str) -> dict[str, Any]:
    pred = mme_yes_no(output)
    rec = {"id": it.id, "subtask": it.subtask, "image": it.pair, "answer": it.answers[0], "output": output}
    return {**rec, "pred": pred, "correct": pred == it.answers[0]}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize_ocr(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean VQA accuracy overall and per group (subtask, style, size), with and without the text."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for key in ("subtask", *GROUP_KEYS):
            if key in r:
                groups[key][r[key]].append(r)

    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        ctl = [r["control_score"] for r in rs if "control_score" in r]
        return {"n": len(rs), "accuracy": _mean([r["score"] for r in rs]), "control_accuracy": _mean(ctl)}

    return {
        **stats(records),
        "groups": {k: {g: stats(rs) for g, rs in sorted(d.items())} for k, d in groups.items()},
        "predictions": records,
    }


def summarize_mme(records: list[dict[str, Any]]) -> dict[str, Any]:
    """MME's per-subtask acc / acc+ / score and the perception total (out of 200 per subtask)."""
    per = mme_scores(records)
    return {
        "n": len(records),
        "accuracy": _mean([float(r["correct"]) for r in records]),
        "subtasks": per,
        "total_score": sum(v["score"] for v in per.values()),
        "max_score": 200 * len(per),
        "other": sum(r["pred"] == "other" for r in records),
        "predictions": records,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def bench_table(report: dict[str, Any]) -> list[str]:
    """The per-subtask table of an OCR or MME report (after the header the runner prints)."""
    if report["task"] == "ocr":
        lines = [f"{'group':<22}{'n':>6}{'VQA acc %':>11}{'no-text %':>11}"]
        lines.append(f"{'all':<22}{report['n']:>6}{_pct(report['accuracy']):>11}{_pct(report['control_accuracy']):>11}")
        for key, d in report["groups"].items():
            for g, v in d.items():
                name = g if key == "subtask" else f"{key}={g}"
                lines.append(f"{name:<22}{v['n']:>6}{_pct(v['accuracy']):>11}{_pct(v['control_accuracy']):>11}")
        if report["control_accuracy"] is not None:
            lines.append("no-text: the same question about the photo without its text (right answers are guesses)")
        return lines
    lines = [f"{'subtask':<12}{'images':>8}{'questions':>11}{'acc':>8}{'acc+':>8}{'score':>8}"]
    for name, v in report["subtasks"].items():
        lines.append(
            f"{name:<12}{v['images']:>8}{v['questions']:>11}{v['acc']:>8.2f}{v['acc_plus']:>8.2f}{v['score']:>8.2f}"
        )
    lines.append(f"total perception score {report['total_score']:.2f} / {report['max_score']} (acc + acc+ per subtask)")
    lines.append(f"answers neither yes nor no: {report['other']}")
    return lines
