"""The tokenizer embedded in a `.gguf` file, read through the one GGUF reader (`checkpoint.gguf`).

`gpt2` (byte-level BPE, e.g. SmolLM2) becomes a `tokenizers.Tokenizer`; `llama` (SentencePiece-style)
uses the same score-merging BPE as llama2.c/llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Tok

from ..checkpoint.common import one_line
from ..checkpoint.gguf import GGUFFile, read_gguf
from .base import Tokenizer
from .bpe import ScoreBPETokenizer
from .hf import HFTokenizer, template_name

# llama.cpp `tokenizer.ggml.pre` names -> pre-tokenizer recipe
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_UNKNOWN, _CONTROL, _USER, _UNUSED = 2, 3, 4, 5


def _gguf_pretokenizer(pre: str) -> Any:
    if pre in _DIGITS_PRE:  # "\p{N}" split first, then the GPT-2 regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "gpt2", "default", others


def _token_id(g: GGUFFile, key: str, n: int) -> int | None:
    i = g.value(f"tokenizer.ggml.{key}", int)
    if i is not None and not 0 <= i < n:
        raise ValueError(
            f"{g.path}: tokenizer.ggml.{key} is {i}, outside the {n}-token vocabulary; the file is damaged"
        )
    return i


def _byte_level_bpe(g: GGUFFile, tokens: list[str], types: list[int], ids: dict[str, int | None]) -> HFTokenizer:
    merges = g.array("tokenizer.ggml.merges", str) or []
    if not all(" " in m for m in merges):
        raise ValueError(f"{g.path}: tokenizer.ggml.merges holds an entry without a space; the file is damaged")
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = _Tok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = _gguf_pretokenizer(g.value("tokenizer.ggml.pre", str, "gpt2"))
        tok.decoder = decoders.ByteLevel()
        added = [AddedToken(t, special=types[i] == _CONTROL, normalized=False)
                 for i, t in enumerate(tokens) if types[i] in (_CONTROL, _USER)]  # fmt: skip
        tok.add_tokens(added)
    except Exception as e:  # tokenizers raises a plain Exception (e.g. a merge of unknown tokens)
        raise ValueError(
            f"{g.path}: the embedded byte-level BPE tokenizer is invalid ({one_line(e)}); the file is damaged"
        ) from e
    return HFTokenizer(
        tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
        add_bos=g.value("tokenizer.ggml.add_bos_token", bool, False),
        chat_template=template_name(g.value("tokenizer.chat_template", str)), path=str(g.path),
    )  # fmt: skip


def _score_bpe(g: GGUFFile, tokens: list[str], types: list[int], ids: dict[str, int | None]) -> ScoreBPETokenizer:
    scores = g.array("tokenizer.ggml.scores", float, len(tokens)) or [0.0] * len(tokens)
    unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    tok = ScoreBPETokenizer(
        [t.replace("\u2581", " ").encode() for t in tokens],
        [float(s) for s in scores],
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        control={i for i, t in enumerate(types) if t in (_CONTROL, _UNUSED)},
        unk_id=unk if unk is not None else _token_id(g, "unknown_token_id", len(tokens)),
        add_space_prefix=g.value("tokenizer.ggml.add_space_prefix", bool, True),
        path=str(g.path),
        pad_id=ids["pad"],
    )
    tok.add_bos = g.value("tokenizer.ggml.add_bos_token", bool, True)
    tok.chat_template = template_name(g.value("tokenizer.chat_template", str))
    return tok


def load_gguf(path: Path) -> Tokenizer:
    g = read_gguf(path)
    model = g.value("tokenizer.ggml.model", str)
    tokens = g.array("tokenizer.ggml.tokens", str)
    if model is None or tokens is None:
        raise ValueError(f"{path}: this GGUF has no embedded tokenizer (tokenizer.ggml.*); pass a tokenizer file")
    n = len(tokens)
    types = g.array("tokenizer.ggml.token_type", int, n) or [1] * n
    ids = {k: _token_id(g, f"{k}_token_id", n) for k in ("bos", "eos")} | {"pad": _token_id(g, "padding_token_id", n)}
    if model == "gpt2":
        return _byte_level_bpe(g, tokens, types, ids)
    if model == "llama":
        return _score_bpe(g, tokens, types, ids)
    raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported; supported: 'gpt2', 'llama'")
