"""`llama-adapter evaluate`: options (`EvalArgs`, validated before anything loads), the runner
(data, then the model through `loading.load_stack`, then the task) and the one-screen table.

Tasks: `loss` (held-out loss / perplexity on instruction data), `mc` (multiple-choice accuracy:
ScienceQA, easy-VQA, JSONL), `ocr` and `mme` (the generated benchmarks of `data make-ocr` /
`make-mme`, or files in their format).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..adapter import AdaptedLLaMA
from ..data import load_examples
from ..loading import LoadedAdapter, Stack, load_stack, resolve_template
from .bench import bench_table, eval_bench
from .bench_data import load_bench
from .items import need_file
from .loss import eval_loss
from .mc import eval_mc
from .mc_data import load_mc
from .model_io import Prompts

TASKS = ("loss", "mc", "ocr", "mme")
FORMATS = ("alpaca", "scienceqa", "easyvqa", "jsonl")
# Which prompt template rule applies (loading.resolve_template): questions are instructions,
# multiple choice continues the paper's plain "The answer is" prompt.
PURPOSE = {"loss": "instruct", "mc": "complete", "ocr": "instruct", "mme": "instruct"}


@dataclass
class EvalArgs:
    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    task: str = "mc"  # loss | mc | ocr | mme
    data: str | None = None
    format: str | None = None  # alpaca | scienceqa | easyvqa | jsonl; None: guessed from --task / --data
    split: str | None = None  # scienceqa: val (default) / test / ...; easyvqa: test (default) / train
    images: str | None = None  # scienceqa: the release's images/ folder; jsonl: root for relative paths
    method: str = "loglik"  # loglik | generate
    norm: str = "sum"  # sum | mean (log-prob divided by the option's token count)
    target: str = "letter"  # letter: score " A", " B"...; text: score " <choice text>"
    candidates: str = "kind"  # easyvqa: kind | all
    template: str = "auto"  # auto | plain | alpaca | chatml
    limit: int | None = None
    batch_size: int = 8
    max_len: int = 512  # loss task: tokens per example (longer ones are cut, as in training)
    max_new_tokens: int = 8
    skip_bad: bool = False
    report: str | None = None
    dtype: str = "float32"
    weights: str = "auto"  # how the frozen weights are held (loading.resolve_weights)
    progress: bool = True
    image_encoder_weights: str | None = None  # None: the path the adapter recorded at training, if any
    controls: bool = True  # ocr: also ask each question about its no-text control photo


def guess_format(args: EvalArgs) -> str:
    if args.format:
        if args.format not in FORMATS:
            raise ValueError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
        return args.format
    if args.task == "loss":
        return "alpaca"
    d = Path(args.data) if args.data else None
    if d is None:
        return "easyvqa"
    if d.is_dir() or d.name == "problems.json":
        return "scienceqa"
    return "jsonl"


def check_args(args: EvalArgs) -> str:
    """Every option checked before data or weights load; returns the data format."""
    if args.task not in TASKS:
        raise ValueError(f"--task {args.task!r}: choose one of {', '.join(TASKS)}")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--max-len", args.max_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.method not in ("loglik", "generate"):
        raise ValueError(f"--method {args.method!r}: choose loglik or generate")
    if args.norm not in ("sum", "mean"):
        raise ValueError(f"--norm {args.norm!r}: choose sum or mean")
    if args.task in ("ocr", "mme"):
        if args.format not in (None, "jsonl"):
            raise ValueError(f"--task {args.task} reads its own JSONL; drop --format {args.format}")
        return "jsonl"
    fmt = guess_format(args)
    if args.task == "loss" and fmt != "alpaca":
        raise ValueError(
            f"--task loss reads instruction data (--format alpaca: Alpaca JSON/JSONL or chat JSONL), "
            f"not {fmt}; use --task mc for multiple choice"
        )
    if args.task == "mc" and fmt == "alpaca":
        raise ValueError("--task mc needs --format scienceqa, easyvqa or jsonl")
    return fmt


def load_task_data(args: EvalArgs, fmt: str) -> Any:
    """The task's examples / items (bad items raise or, with --skip-bad, are counted)."""
    if args.task == "loss":
        return load_examples(need_file(args.data, "--task loss"))[: args.limit]
    if args.task == "mc":
        kw: dict[str, Any] = {"limit": args.limit, "split": args.split, "candidates": args.candidates}
        if fmt != "easyvqa":
            kw.update(images=args.images, skip_bad=args.skip_bad)
        return load_mc(fmt, args.data, **kw)
    return load_bench(args.data, args.task, skip_bad=args.skip_bad, limit=args.limit)


def as_stack(model: Any, tok: Any, meta: dict[str, Any] | None = None, name: str = "model") -> Stack:
    """A `Stack` around an already loaded model (a base `LLaMA`, or an `AdaptedLLaMA` with its
    adapter metadata), for callers that evaluate a model they hold in memory."""
    if not isinstance(model, AdaptedLLaMA):
        return Stack(model, tok, "plain", name)
    adapter = LoadedAdapter("adapter", model, meta or {}, "plain", "")
    return Stack(model.model, tok, "plain", name, {"adapter": adapter})


def _image_prompts(stack: Stack, name: str | None) -> Prompts | None:
    """Batch image prompts of a multimodal adapter (None for text-only models: no images used)."""
    a = stack.adapter(name)
    if a is None or not a.multimodal:
        return None
    a.image_weights()  # a recorded encoder checkpoint that is gone fails now, before any work
    return lambda images: stack.batch_prompt(name, images)


def run(args: EvalArgs, stack: Stack | None = None) -> dict[str, Any]:
    """Everything `llama-adapter evaluate` does except printing; returns the report. `stack`: a
    model already loaded (see `as_stack`); default: `args.model` + `args.adapter` via load_stack."""
    fmt = check_args(args)
    data = load_task_data(args, fmt)  # bad data fails before time goes into loading the model
    if stack is None:
        stack = load_stack(
            args.model, args.adapter, dtype=args.dtype, template=args.template, purpose=PURPOSE[args.task],
            weights=args.weights,
            image_encoder_weights=args.image_encoder_weights,
        )  # fmt: skip
    name = next(iter(stack.adapters), None)
    a = stack.adapter(name)
    template = resolve_template(args.template, stack.tokenizer, None if a is None else a.meta, PURPOSE[args.task])
    model = stack.model if a is None else a.model
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "task": args.task,
        "format": fmt,
        "model": args.model,
        "adapter": args.adapter,
        "data": args.data,
        "split": args.split,
        "template": template,
    }
    prompts = _image_prompts(stack, name) if args.task != "loss" else None
    report.update(TASK_RUNNERS[args.task](args, model, stack.tokenizer, data, template, prompts))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["args"] = asdict(args)
    if args.report:
        p = Path(args.report)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=2, default=str))
    return report


def _run_loss(args: EvalArgs, model: Any, tok: Any, examples: Any, template: str, prompts: Any) -> dict[str, Any]:
    return eval_loss(
        model, tok, examples, template=template, max_len=args.max_len, batch_size=args.batch_size,
        progress=args.progress,
    )  # fmt: skip


def _skips(data: Any) -> dict[str, Any]:
    if not data.items:
        raise ValueError(f"every item was skipped as bad ({len(data.skipped)}); nothing to evaluate")
    return {"n_skipped": len(data.skipped), "skipped": data.skipped, "notes": data.notes}


def _run_mc(args: EvalArgs, model: Any, tok: Any, mc: Any, template: str, prompts: Any) -> dict[str, Any]:
    skips = _skips(mc)
    loglik = args.method == "loglik"
    res = eval_mc(
        model, tok, mc.items, template=template, method=args.method, norm=args.norm, target=args.target,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=args.progress, prompts=prompts,
    )  # fmt: skip
    if any(it.image for it in mc.items) and not res["images_used"]:
        skips["notes"].append("items have images but the model has no image adapter: evaluated text-only")
    head = {"method": args.method, "norm": args.norm if loglik else None, "target": args.target if loglik else None}
    return {**head, **res, **skips}


def _run_bench(args: EvalArgs, model: Any, tok: Any, bench: Any, template: str, prompts: Any) -> dict[str, Any]:
    skips = _skips(bench)
    res = eval_bench(
        model, tok, bench.items, task=args.task, template=template, prompts=prompts, controls=args.controls,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=args.progress,
    )  # fmt: skip
    cfg = getattr(model, "adapter_config", None)
    encoder = cfg.image_encoder if prompts is not None and cfg is not None else None
    if prompts is None:
        skips["notes"].append(
            "text-only model: the images were not used, so the scores are its text prior (the question alone)"
        )
    return {"method": "generate", "images_used": prompts is not None, "image_encoder": encoder, **res, **skips}


TASK_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "loss": _run_loss,
    "mc": _run_mc,
    "ocr": _run_bench,
    "mme": _run_bench,
}


def format_table(report: dict[str, Any]) -> str:
    """A one-screen summary of a report."""
    lines = [
        f"{report['task']} | {report['format']} | model {report['model']}"
        + (f" + adapter {report['adapter']}" if report.get("adapter") else "")
        + f" | template {report['template']}"
    ]
    if report["task"] == "loss":
        lines += [
            f"{'examples':<12}{report['n_examples']:>10}",
            f"{'tokens':<12}{report['n_tokens']:>10}",
            f"{'loss':<12}{report['loss']:>10.4f}",
            f"{'perplexity':<12}{report['perplexity']:>10.3f}",
        ]
        if report["n_truncated"] or report["n_dropped"]:
            lines.append(f"truncated {report['n_truncated']}, dropped {report['n_dropped']} (raise --max-len)")
        return "\n".join(lines)
    if report["task"] == "mc":
        lines += _mc_table(report)
    else:
        used = f"yes ({report['image_encoder']})" if report["images_used"] else "no (text-only model: text prior)"
        lines.append(f"greedy short answers | images used: {used}")
        lines += bench_table(report)
    lines.append(f"skipped bad items: {report['n_skipped']}")
    for s in report["skipped"][:3]:
        lines.append(f"  {s['where']}: {s['reason']}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _mc_table(report: dict[str, Any]) -> list[str]:
    how = report["method"] + (f" ({report['target']}, {report['norm']})" if report["method"] == "loglik" else "")
    lines = [f"method {how} | images used: {'yes' if report['images_used'] else 'no'}"]
    lines.append(f"{'group':<24}{'n':>7}{'accuracy':>10}")
    lines.append(f"{'all':<24}{report['n']:>7}{100 * report['accuracy']:>9.2f}%")
    for key, d in report["groups"].items():
        for g, v in list(d.items())[:8]:
            lines.append(f"{key + '=' + g:<24}{v['n']:>7}{100 * v['accuracy']:>9.2f}%")
    if report.get("chance") is not None:
        lines.append(f"{'chance':<24}{'':>7}{100 * report['chance']:>9.2f}%")
    if report["method"] == "generate":
        lines.append(f"unparsed answers: {report['unparsed']}")
    return lines
