"""Tokenizers behind one interface, plus the chat/instruction prompt templates.

Supported files (`load_tokenizer`), one module each:
- SentencePiece `.model` (LLaMA 1/2) through the `sentencepiece` library (`spm`);
- llama2.c `tokenizer.bin` (int32 max_token_length, then per token: float32 score, int32 length, bytes),
  encoded with llama2.c's greedy best-score pair merging (`bpe`);
- Hugging Face `tokenizer.json` (or a directory holding one) through the `tokenizers` library (`hf`);
- the tokenizer embedded in a `.gguf` file: `gpt2` (byte-level BPE, e.g. SmolLM2) becomes a
  `tokenizers.Tokenizer`; `llama` (SentencePiece-style) uses the same score-merging BPE as llama2.c/llama.cpp
  (`gguf`).

Every tokenizer decodes through the same rule so that streaming (`Tokenizer.decoder()`) and `decode` agree:
special/control tokens are skipped and, for SentencePiece-style vocabularies, the dummy-prefix space of the
first piece is stripped. A damaged file is a one-line ValueError naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint.gguf import read_gguf_metadata
from .base import STOP_TOKENS, IncrementalDecoder, Tokenizer
from .bpe import ScoreBPETokenizer, load_llama2c, write_llama2c
from .gguf import load_gguf
from .hf import HFTokenizer, load_hf
from .spm import SentencePieceTokenizer
from .templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    SMOLLM2_SYSTEM,
    TEMPLATES,
    TURN_END,
    alpaca_prompt,
    render_chat,
)

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "SMOLLM2_SYSTEM", "STOP_TOKENS", "SUPPORTED_FORMATS", "TEMPLATES",
    "TURN_END", "HFTokenizer", "IncrementalDecoder", "ScoreBPETokenizer", "SentencePieceTokenizer", "Tokenizer",
    "alpaca_prompt", "export_tokenizer", "load_tokenizer", "render_chat",
]  # fmt: skip

SUPPORTED_FORMATS = (
    "SentencePiece .model",
    "llama2.c tokenizer .bin",
    "Hugging Face tokenizer.json (file or directory)",
    ".gguf (tokenizer.ggml.model gpt2 or llama)",
)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """Load a tokenizer; the format is picked from the file name/extension (see SUPPORTED_FORMATS).
    None (a model with no tokenizer next to it, see `checkpoint.load_model`) is a ValueError naming --tokenizer."""
    if path is None:
        raise ValueError(
            "no tokenizer found next to the model; pass --tokenizer PATH (a tokenizer.model, tokenizer.json, "
            "llama2.c tokenizer.bin or .gguf)"
        )
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}; pass a path to one of: {', '.join(SUPPORTED_FORMATS)}")
    if p.is_dir() or p.suffix == ".json":
        return load_hf(p)
    if p.suffix == ".gguf":
        return load_gguf(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".bin":
        return load_llama2c(p)
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return load_gguf(p)
    raise ValueError(f"{p}: unknown tokenizer format; supported: {', '.join(SUPPORTED_FORMATS)}")


def _export_gguf(path: Path, tok: Tokenizer, out: Path) -> list[str]:
    """A GGUF's byte-level BPE -> tokenizer.json + tokenizer_config.json; its SentencePiece-style vocabulary
    -> a llama2.c tokenizer.bin (+ tokenizer_config.json for the chat template)."""
    config: dict[str, Any] = {"add_bos_token": tok.add_bos}
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[key] = (
                tok.tok.id_to_token(i) if isinstance(tok, HFTokenizer) else tok.pieces[i].decode(errors="replace")
            )
    jinja = read_gguf_metadata(path, "tokenizer.chat_template").get("tokenizer.chat_template")
    if isinstance(jinja, str):
        config["chat_template"] = jinja
    if isinstance(tok, HFTokenizer):
        tok.tok.save(str(out / "tokenizer.json"))
        written = ["tokenizer.json"]
    else:
        write_llama2c(tok, out / "tokenizer.bin")
        written = ["tokenizer.bin"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [*written, "tokenizer_config.json"]


def export_tokenizer(path: str | Path, out_dir: str | Path) -> list[str]:
    """Put the tokenizer at `path` into the model directory `out_dir`, in a form `load_tokenizer` reads
    there (see `checkpoint.sources`); returns the file names written. Hugging Face files and a
    SentencePiece `.model` are copied (transformers reads them too); a llama2.c `.bin` is copied as
    tokenizer.bin; a GGUF's tokenizer is converted (`_export_gguf`)."""
    p, out = Path(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if p.is_dir():
        names = [n for n in HF_TOKENIZER_FILES if (p / n).is_file()]
        for n in names:
            shutil.copy2(p / n, out / n)
        return names
    if p.suffix in (".model", ".bin", ".json"):
        name = {".model": "tokenizer.model", ".bin": "tokenizer.bin", ".json": "tokenizer.json"}[p.suffix]
        shutil.copy2(p, out / name)
        return [name]
    return _export_gguf(p, load_tokenizer(p), out)  # load_tokenizer: a clear error for what is no tokenizer
