"""`llama-adapter <command>`: thin wrappers over the library. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from .loading import WEIGHTS, WEIGHTS_HELP

EXAMPLES = {
    "convert": "llama-adapter convert adapter peft_dir/ runs/from_peft --to ours --base smollm2-135m-instruct\n"
    "  llama-adapter convert adapter runs/alpaca runs/alpaca_peft --to peft\n"
    "  llama-adapter convert adapter llama_adapter_len10_layer30_release.pth runs/official --base llama7b_dir\n"
    "  llama-adapter convert base smollm2-135m-instruct hf_out/ --dtype bfloat16",
    "adapters": "llama-adapter adapters list runs/\n  llama-adapter adapters inspect runs/alpaca --json",
    "serve": "llama-adapter serve --model smollm2-135m-instruct --adapter alpaca=runs/alpaca --port 8000\n"
    "  then open http://127.0.0.1:8000/ or POST /v1/chat/completions",
    "evaluate": "llama-adapter evaluate --model smollm2-135m-instruct --task loss "
    "--data ../shared/data/alpaca/alpaca_en_demo.json --limit 50\n"
    "  llama-adapter evaluate --model smollm2-135m-instruct --adapter runs/sqa --task mc --format scienceqa "
    "--data ScienceQA/data/scienceqa --split val --images ScienceQA/images --report sqa.json\n"
    "  llama-adapter evaluate --model smollm2-135m-instruct --adapter runs/vqa --task mc --format easyvqa --limit 200\n"
    "  llama-adapter evaluate --model stories260k --task mc --data mc.jsonl --method generate --skip-bad\n"
    "  llama-adapter evaluate --model smollm2-135m-instruct --adapter runs/ocr --task ocr --data bench/ocr/test.jsonl "
    "--report ocr.json\n"
    "  llama-adapter evaluate --model smollm2-135m-instruct --adapter runs/mme --task mme --data bench/mme/test.jsonl",
    "data": "llama-adapter data make-ocr --out bench/ocr --n-train 1000 --n-test 200 --seed 0\n"
    "  llama-adapter data make-mme --out bench/mme --n-train 1000 --n-test 250\n"
    "  # the same files train an adapter:\n"
    "  llama-adapter finetune --model smollm2-135m-instruct --data bench/ocr/train.jsonl "
    "--image-encoder efficientnet-lite0 --out runs/ocr",
    "generate": "llama-adapter generate --model smollm2-135m-instruct --prompt 'Name three primary colours.'\n"
    "  llama-adapter generate --model stories260k --template plain --prompt 'Once upon a time'\n"
    "  llama-adapter generate --model smollm2-135m-instruct --adapter runs/alpaca --prompt 'Give me a tip.'\n"
    "  llama-adapter generate --adapter runs/flickr --image dog.jpg --prompt 'Describe the image.'\n"
    "  # a batch with and without images: one --image per --prompt, 'none' (or '-') for a text-only row\n"
    "  llama-adapter generate --adapter runs/flickr --prompt 'Describe the image.' --image dog.jpg \\\n"
    "      --prompt 'Describe the image.' --image none --prompt 'What is in the photo?' --image cat.png\n"
    '  # the same from a file: one JSON object per line, {"prompt": ..., "image": path or null}\n'
    '  #   (image paths relative to the file); results go to stdout as JSONL with an "output" field\n'
    "  llama-adapter generate --adapter runs/flickr --batch prompts.jsonl --batch-size 8 > outputs.jsonl\n"
    "  # other modalities, for an adapter built for them (adapter_config.json: modalities.takes):\n"
    "  llama-adapter generate --adapter runs/bind --prompt 'Describe it.' --video clip.mp4 --points none \\\n"
    "      --prompt 'What shape is this?' --video none --points cloud.ply",
    "chat": "llama-adapter chat --model smollm2-135m-instruct --adapter runs/alpaca\n"
    "  llama-adapter chat --adapter runs/flickr --image photo.jpg\n"
    "  llama-adapter chat --adapter runs/bind --points cloud.ply\n"
    "  in the chat: /image PATH attaches an image from the next turn on (it conditions the whole\n"
    "  conversation: a multimodal adapter adds it to its prompts, not at a place in the text);\n"
    "  /audio, /video and /points do the same for the other modalities (one input at a time);\n"
    "  /image none detaches it; /reset forgets the conversation; /help lists the commands",
    "finetune": "llama-adapter finetune --model smollm2-135m-instruct "
    "--data ../shared/data/alpaca/alpaca_en_demo.json --out runs/alpaca --epochs 1\n"
    "  llama-adapter finetune --model stories260k --data data.jsonl --out runs/tiny --max-steps 20\n"
    "  llama-adapter finetune --devices 2 --strategy ddp --model stories260k --data data.jsonl --out runs/ddp\n"
    "  torchrun --nproc-per-node 8 -m llama_adapter finetune --strategy fsdp --device cuda --precision bf16 "
    "--model llama2-7b-dir --data alpaca.json --out runs/7b  (see docs/distributed.md)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama-adapter",
        description="Train and run LLaMA-Adapter (zero-init attention) adapters on frozen LLaMA-family models.",
        epilog="example:\n  " + EXAMPLES["generate"].split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog="example:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            default="smollm2-135m-instruct",
            help="preset name (smollm2-135m-instruct, stories260k) or a path: llama2.c .bin, .gguf, "
            "HF directory, Meta directory (default: %(default)s)",
        )
        sp.add_argument("--adapter", help="adapter directory written by `finetune`")
        sp.add_argument("--tokenizer", help="tokenizer file when none lies next to the weights")
        sp.add_argument("--template", default="auto", help="prompt template: auto, plain, alpaca, chatml")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument(
            "--weights",
            default="auto",
            choices=WEIGHTS,
            help=WEIGHTS_HELP,
        )

    def sampling_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--max-new-tokens", type=int, default=256)
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sp.add_argument("--top-k", type=int)
        sp.add_argument("--top-p", type=float)
        sp.add_argument("--repetition-penalty", type=float, default=1.0)
        sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        sp.add_argument("--seed", type=int)
        sp.add_argument("--compile", action="store_true", help="torch.compile the decode step")
        sp.add_argument(
            "--image-encoder-weights",
            help="image encoder checkpoint for a multimodal adapter (default: the one recorded in the "
            "adapter's adapter_config.json at training time, else the encoder's packaged weights)",
        )

    g = cmd("generate", "Generate a completion for a prompt, streamed to stdout.")
    model_args(g)
    sampling_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; '-' reads stdin)")
    _input_flags(g, batch=True)
    g.add_argument(
        "--batch",
        metavar="FILE",
        help='JSONL of {"prompt": ..., "image" (or "audio", "video", "points"): path or null} (instead of '
        '--prompt and the input flags); writes one JSON object per line with an "output" field',
    )
    g.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default: %(default)s)")

    c = cmd("chat", "Interactive chat in the terminal (empty line or Ctrl-D quits).")
    model_args(c)
    sampling_args(c)
    _input_flags(c, batch=False)

    f = cmd("finetune", "Train an adapter on instruction data (Alpaca JSON/JSONL or chat JSONL).")
    _finetune_args(f)
    cv = cmd("convert", "Convert adapters (ours / PEFT / official LLaMA-Adapter) or base checkpoints (to HF).")
    cvs = cv.add_subparsers(dest="what", metavar="WHAT", required=True)
    ca = cvs.add_parser("adapter", help="SRC adapter (dir or .pth) -> DST in another format")
    ca.add_argument("src")
    ca.add_argument("dst")
    ca.add_argument("--to", choices=["ours", "peft", "official"], default="ours")
    ca.add_argument("--base", help="base model spec (needed to import PEFT/official adapters)")
    ca.add_argument(
        "--gate-activation",
        choices=["identity", "tanh"],
        help="official adapters: identity reproduces the released demo, tanh the training code",
    )
    ca.add_argument("--adapter-len", type=int, help="K, when it cannot be inferred from the shapes")
    ca.add_argument("--strict", action="store_true", help="refuse approximate conversions")
    cb = cvs.add_parser("base", help="any base checkpoint -> Hugging Face safetensors directory")
    cb.add_argument("src")
    cb.add_argument("out")
    cb.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    cb.add_argument("--shard-size", default="5GB")
    ad = cmd("adapters", "List or inspect adapters: config, size, parameters and the base they need.")
    ads = ad.add_subparsers(dest="what", metavar="WHAT", required=True)
    ads.add_parser("list", help="every adapter under DIR").add_argument("dir")
    ai = ads.add_parser("inspect", help="one adapter (dir, PEFT dir or official .pth)")
    ai.add_argument("path")
    ai.add_argument("--json", action="store_true")

    from .serve import add_arguments as add_serve_arguments

    add_serve_arguments(cmd("serve", "OpenAI-compatible HTTP API (streaming, several adapters, images) + web chat."))
    _evaluate_args(cmd("evaluate", "Held-out loss/perplexity, multiple choice, OCR / MME (JSON report + table)."))
    _data_args(cmd("data", "Generate benchmark data: a TextVQA-style OCR set, an MME-style perception set."))
    return p


def _finetune_args(f: argparse.ArgumentParser) -> None:
    """One flag per TrainArgs field; the adapter's own options (AdapterConfig's) in a group of their own."""
    from .config import AdapterConfig
    from .train import ADAPTER_OPTIONS, TrainArgs

    helps = {**_field_comments(AdapterConfig), **_field_comments(TrainArgs)}
    adapter = f.add_argument_group("adapter options (AdapterConfig)")
    for fld in fields(TrainArgs):
        if fld.name in ("extra",):
            continue
        sp = adapter if fld.name in ADAPTER_OPTIONS else f
        flag = "--" + fld.name.replace("_", "-")
        doc = helps.get(fld.name, "")
        if fld.type == "bool":  # a default-on option (--pack) also gets its --no- form
            action = argparse.BooleanOptionalAction if fld.default is True else "store_true"
            sp.add_argument(flag, action=action, default=fld.default, help=f"{doc} (default: {fld.default})".strip())
            continue
        typ = {"int": int, "float": float}.get(fld.type.split(" ")[0], str)
        sp.add_argument(
            flag, type=typ, default=fld.default, required=fld.name == "data",
            help=f"{doc} (default: {fld.default})".strip(),
        )  # fmt: skip


INPUT_HELP = {
    "image": "image file",
    "audio": "audio file (mp3, wav, flac, ogg)",
    "video": "video (mp4, webm, gif via PyAV/PIL) or a folder of frames; 8 frames sampled uniformly",
    "points": "point cloud (.ply ascii/binary, .npy, .xyz; N x 3 or N x 6 with colour)",
}


def _input_flags(sp: argparse.ArgumentParser, batch: bool) -> None:
    """--image / --audio / --video / --points: one per row (generate) or the conversation's (chat)."""
    for m, what in INPUT_HELP.items():
        if batch:
            rows = "once for every prompt, or once per --prompt in the same order, 'none' or '-' for a row without"
            sp.add_argument(f"--{m}", action="append", help=f"{what} for an adapter that takes {m}: {rows}")
        else:
            sp.add_argument(f"--{m}", help=f"{what} the conversation is about; /{m} PATH changes it")


def _field_comments(cls: type) -> dict[str, str]:
    """A dataclass field's `# comment` in its source (trailing, else the first sentence of the
    comment lines just above it), so `finetune --help` and the dataclass document each option in
    one place. Empty when the source is not available."""
    import inspect
    import re

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    above: list[str] = []
    for line in src.splitlines():
        if m := re.match(r"^\s+#\s?(.*)$", line):
            above.append(m.group(1).strip())
            continue
        m = re.match(r"^\s+(\w+): [^\n=]+= [^\n#]*?(?:#\s*(.+))?$", line)
        if m and (m.group(2) or above):
            text = m.group(2) or re.split(r"(?<=\.)\s", " ".join(above), maxsplit=1)[0]
            out[m.group(1)] = text.strip().replace("%", "%%")
        above = []
    return out


def _evaluate_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (as for generate)")
    e.add_argument("--adapter", help="adapter directory written by `finetune`")
    e.add_argument(
        "--task",
        choices=["loss", "mc", "ocr", "mme"],
        required=True,
        help="loss: loss + perplexity; mc: accuracy; ocr: VQA accuracy (data make-ocr files); "
        "mme: acc / acc+ / score (data make-mme files)",
    )
    e.add_argument(
        "--data",
        help="instruction data (loss); problems.json or its folder (scienceqa); JSONL (jsonl, ocr, mme)",
    )
    e.add_argument(
        "--format",
        choices=["alpaca", "scienceqa", "easyvqa", "jsonl"],
        help="default: alpaca for --task loss; scienceqa for a folder / problems.json; easyvqa "
        "without --data; else jsonl",
    )
    e.add_argument("--split", help="scienceqa split (default val); easyvqa split (default test)")
    e.add_argument("--images", help="scienceqa images/ folder (IMAGES/<split>/<pid>/image.png); jsonl image root")
    e.add_argument("--method", choices=["loglik", "generate"], default="loglik")
    e.add_argument("--norm", choices=["sum", "mean"], default="sum", help="loglik: sum or per-token mean log-prob")
    e.add_argument(
        "--target",
        choices=["letter", "text"],
        default="letter",
        help="loglik: score the option letter (' A') or the option text",
    )
    e.add_argument(
        "--candidates",
        choices=["kind", "all"],
        default="kind",
        help="easyvqa: answers of the question's kind (yes/no, shape, colour) or all 13",
    )
    e.add_argument("--template", default="auto", help="auto (the adapter's, else chatml/plain), plain, alpaca, chatml")
    e.add_argument("--limit", type=int, help="first N items")
    e.add_argument("--batch-size", type=int, default=8, help="questions (mc) or examples (loss) per forward")
    e.add_argument("--max-len", type=int, default=512, help="loss: tokens per example")
    e.add_argument("--max-new-tokens", type=int, default=8, help="generate, ocr, mme: tokens to decode per answer")
    e.add_argument("--no-controls", action="store_true", help="ocr: skip the no-text control photos (half the time)")
    e.add_argument("--skip-bad", action="store_true", help="skip (and count) bad items instead of stopping")
    e.add_argument("--report", help="write the JSON report here")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHTS,
        help=WEIGHTS_HELP,
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    e.add_argument(
        "--image-encoder-weights",
        help="image encoder checkpoint for a multimodal adapter (default: the one the adapter recorded at training)",
    )


def _data_args(d: argparse.ArgumentParser) -> None:
    ds = d.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, (n_train, n_test), about in (
        ("make-ocr", (1000, 200), "words and numbers drawn on Flickr8k photos, with no-text controls"),
        ("make-mme", (1000, 250), "shapes, positions, counts, colours and words; two yes/no questions per image"),
    ):
        example = next(line.strip() for line in EXAMPLES["data"].splitlines() if what in line)
        m = ds.add_parser(
            what, help=about, description=about, epilog="example:\n  " + example,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        m.add_argument("--out", required=True, help="folder for images/, train.jsonl, test.jsonl and meta.json")
        m.add_argument("--n-train", type=int, default=n_train, help="training images (default: %(default)s)")
        m.add_argument("--n-test", type=int, default=n_test, help="test images (default: %(default)s)")
        m.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
        m.add_argument("--photos", help="photo folder (default: ../shared/data/flickr8k_1k/images)")
        m.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # the user's input or machine: one line, what to fix
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is our bug: show it, and say so
        import traceback

        traceback.print_exc()
        print(
            "error: this is a bug in llama-adapter, not in your input; please report it with the command you ran "
            "and the traceback above",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split())


def _stack(args: argparse.Namespace, purpose: str):
    """Base + tokenizer + the --adapter (if any) + template, by the one loader."""
    from .loading import load_stack

    return load_stack(
        args.model, args.adapter, dtype=args.dtype, template=args.template, purpose=purpose, weights=args.weights,
        tokenizer=getattr(args, "tokenizer", None), image_encoder_weights=getattr(args, "image_encoder_weights", None),
    )  # fmt: skip


def _adapter_name(stack) -> str | None:
    return next(iter(stack.adapters), None)


def _params(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=list(args.stop),
        seed=args.seed,
    )


def _note_clamped(rows, context: int) -> None:
    for r in rows:
        if r.max_new < r.params.max_new_tokens and r.finish == "length":
            print(
                f"note: row {r.tag}: --max-new-tokens {r.params.max_new_tokens} was shortened to {r.max_new} "
                f"to fit the model's context ({context} tokens with the {len(r.prompt_ids)}-token prompt)",
                file=sys.stderr,
            )


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from .generate import encode_prompts, make_rows, run_rows, stop_ids_of
    from .loading import render_prompt
    from .prompt_rows import generate_rows, open_inputs

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    rows_in, from_file = generate_rows(args)  # every path checked before loading anything
    stack = _stack(args, "complete")
    name = _adapter_name(stack)
    opened = open_inputs(stack, name, rows_in)
    tok, params = stack.tokenizer, _params(args)
    ids = encode_prompts(tok, [render_prompt(r.prompt, stack.template_of(name)) for r in rows_in])
    model = stack.only()
    stream = len(rows_in) == 1 and not from_file
    for s in range(0, len(ids), args.batch_size):
        sl = slice(s, s + args.batch_size)
        ctx = stack.batch_prompt(name, opened[sl])
        rows = make_rows(ids[sl], params, stop_ids=stop_ids_of(tok), ctx=ctx, tokenizer=tok)
        for r in rows:
            r.tag += s
            if stream:
                r.on_text = lambda row, delta: (sys.stdout.write(delta), sys.stdout.flush())
        run_rows(model, rows, compile=args.compile)
        _note_clamped(rows, stack.model.config.max_seq_len)
        for r in rows:
            row = rows_in[r.tag]
            if stream:
                sys.stdout.write("\n")
            elif from_file:
                print(json.dumps(row.record(r.text), ensure_ascii=False))
            else:
                print(f"--- [{r.tag}]{row.tag} {row.prompt}\n{r.text}")
            sys.stdout.flush()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .multimodal import MODALITIES

    given = [(m, getattr(args, m)) for m in MODALITIES if getattr(args, m, None)]
    if len(given) > 1:
        raise ValueError(f"give one of {', '.join('--' + m for m, _ in given)}: a conversation has one input")
    stack = _stack(args, "chat")
    name = _adapter_name(stack)
    session = ChatSession(stack, name, _params(args), compile=args.compile)
    for m, path in given:  # errors here end the command (exit 2): the user asked for this input up front
        session.set_input(m, path)
    attached = "".join(f" + {m} {p}" for m, p in given)
    print(f"chat with {args.model}{' + ' + args.adapter if args.adapter else ''}{attached} (empty line quits, "
          "/help for commands)", file=sys.stderr)  # fmt: skip
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        try:  # a bad path is a typo to fix, not a reason to lose the conversation
            shown = session.command(line)
        except (ValueError, OSError) as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            continue
        if shown is not None:
            print(shown, file=sys.stderr)
            continue
        session.reply(line, on_text=lambda delta: (sys.stdout.write(delta), sys.stdout.flush()))
        sys.stdout.write("\n")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import os

    from .distributed import DistributedError, launch, launched_by_torchrun
    from .train import TrainArgs, finetune

    targs = TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs) if hasattr(args, f.name)})
    if (targs.devices or 1) > 1 and not launched_by_torchrun():
        targs.validate(targs.devices)  # bad options: one error here, not one per process
        return launch(_finetune_argv(targs, args.verbose), targs.devices)
    try:
        res = finetune(targs)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if res.stopped == "nan":
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    first = res.val_losses[0][1] if res.val_losses else float("nan")
    last = res.val_losses[-1][1] if res.val_losses else float("nan")
    print(f"trained {res.steps} steps; held-out loss {first:.4f} -> {last:.4f}; adapter saved to {Path(targs.out)}")
    return 0


def _finetune_argv(targs, verbose: bool) -> list[str]:
    """The command line that reproduces `targs`, for the processes `--devices N` starts."""
    argv = ["-v"] if verbose else []
    argv.append("finetune")
    for f in fields(targs):
        value = getattr(targs, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is False and f.default is True:
            argv.append("--no-" + flag[2:])
        if f.name == "extra" or value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import fields as dc_fields

    from .evaluate import EvalArgs, format_table, run

    kw = {f.name: getattr(args, f.name) for f in dc_fields(EvalArgs) if hasattr(args, f.name)}
    print(format_table(run(EvalArgs(**kw, progress=not args.no_progress, controls=not args.no_controls))))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .evaluate import make_mme, make_ocr

    make = make_ocr if args.what == "make-ocr" else make_mme
    kw = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.seed, "photos": args.photos}
    paths = make(args.out, **kw, progress=not args.no_progress)
    for split, path in paths.items():
        n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"{split}: {path} ({n} questions)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import interop

    if args.what == "adapter":
        report = interop.convert_adapter(
            args.src,
            args.dst,
            to=args.to,
            base=args.base,
            gate_activation=args.gate_activation,
            adapter_len=args.adapter_len,
            strict=args.strict,
        )
    else:
        report = interop.convert_base(args.src, args.out, dtype=getattr(torch, args.dtype), shard_size=args.shard_size)
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    import json

    from . import interop

    if args.what == "inspect":
        info = interop.inspect_adapter(args.path)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            for k, v in info.items():
                if k != "tensors":
                    print(f"{k:22} {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
        return 0
    rows = interop.list_adapters(args.dir)
    print(f"{'name':30} {'format':10} {'K':>4} {'L':>4} {'params':>10} {'size':>10}  base")
    for r in rows:
        base = r.get("base") or {}
        cfg = r.get("config") or {}
        print(
            f"{str(r.get('name', '')):30} {str(r.get('format', '')):10} {str(cfg.get('adapter_len', '')):>4} "
            f"{str(cfg.get('adapter_layers', '')):>4} {str(r.get('trainable_parameters', '')):>10} "
            f"{str(r.get('size_bytes', '')):>10}  {base.get('name', '') if isinstance(base, dict) else base}"
            f"{'  error: ' + r['error'] if r.get('error') else ''}"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_main  # fastapi is imported only when serving

    return serve_main(args)


COMMANDS = {
    "convert": cmd_convert,
    "adapters": cmd_adapters,
    "serve": cmd_serve,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
    "data": cmd_data,
}

if __name__ == "__main__":
    sys.exit(main())
