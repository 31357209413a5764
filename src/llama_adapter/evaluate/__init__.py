"""Evaluation: held-out loss, multiple choice, and the OCR / MME image benchmarks.

One module per job, dependencies pointing down the list:

    items.py        what every reader shares: bad items (file:line errors or counted skips), JSONL, progress
    model_io.py     asking the model: token log-probs (one forward) and greedy short answers (the engine)
    mc_data.py      multiple-choice items from JSONL, ScienceQA and easy-VQA
    mc.py           multiple-choice prompts and scoring (log-likelihood, or generate and parse)
    loss.py         held-out loss / perplexity on instruction data
    words.py        the vocabulary the OCR generators draw
    synth.py        drawing (text, shapes, photos), hash splits and the output folder of the generators
    ocr.py          the TextVQA-style OCR set generator (`data make-ocr`)
    mme.py          the MME-style perception set generator (`data make-mme`)
    bench_data.py   reading OCR / MME benchmark JSONL
    bench.py        answering and scoring the benchmarks (VQA accuracy; MME acc / acc+ / score)
    run.py          `EvalArgs`, the runner behind `llama-adapter evaluate`, the table
"""

from .bench import eval_bench, summarize_mme, summarize_ocr
from .bench_data import BenchItem, load_bench
from .loss import eval_loss
from .mc import ANSWER_PREFIX, continuations, eval_mc, mc_body, mc_prompt, parse_answer, score_batch, split_continuation
from .mc_data import (
    LETTERS,
    MCData,
    MCItem,
    easyvqa_kind,
    load_easyvqa,
    load_mc,
    load_mc_jsonl,
    load_scienceqa,
)
from .mme import MME_SUBTASKS, make_mme
from .ocr import OCR_SUBTASKS, make_ocr
from .run import FORMATS, TASKS, EvalArgs, as_stack, format_table, guess_format, run

__all__ = [
    "ANSWER_PREFIX",
    "FORMATS",
    "LETTERS",
    "MME_SUBTASKS",
    "OCR_SUBTASKS",
    "TASKS",
    "BenchItem",
    "EvalArgs",
    "MCData",
    "MCItem",
    "as_stack",
    "continuations",
    "easyvqa_kind",
    "eval_bench",
    "eval_loss",
    "eval_mc",
    "format_table",
    "guess_format",
    "load_bench",
    "load_easyvqa",
    "load_mc",
    "load_mc_jsonl",
    "load_scienceqa",
    "make_mme",
    "make_ocr",
    "mc_body",
    "mc_prompt",
    "parse_answer",
    "run",
    "score_batch",
    "split_continuation",
    "summarize_mme",
    "summarize_ocr",
]
