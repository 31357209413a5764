"""Tokenizers behind one interface, plus the chat/instruction prompt templates.

Supported files (`load_tokenizer`):
- SentencePiece `.model` (LLaMA 1/2) through the `sentencepiece` library;
- llama2.c `tokenizer.bin` (int32 max_token_length, then per token: float32 score, int32 length, bytes),
  encoded with llama2.c's greedy best-score pair merging;
- Hugging Face `tokenizer.json` (or a directory holding one) through the `tokenizers` library;
- the tokenizer embedded in a `.gguf` file: `gpt2` (byte-level BPE, e.g. SmolLM2) becomes a
  `tokenizers.Tokenizer`; `llama` (SentencePiece-style) uses the same score-merging BPE as llama2.c/llama.cpp.

Every tokenizer decodes through the same rule so that streaming (`Tokenizer.decoder()`) and `decode` agree:
special/control tokens are skipped and, for SentencePiece-style vocabularies, the dummy-prefix space of the
first piece is stripped.
"""

from __future__ import annotations

import heapq
import json
import mmap
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUPPORTED_FORMATS = (
    "SentencePiece .model",
    "llama2.c tokenizer .bin",
    "Hugging Face tokenizer.json (file or directory)",
    ".gguf (tokenizer.ggml.model gpt2 or llama)",
)
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# --------------------------------------------------------------------------------------------------- interface
class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only newly completed text, `flush()` the rest.

    It decodes a small window (the last emitted token(s) as left context plus the pending ones) and emits the
    difference, so SentencePiece leading spaces come out right and partial UTF-8 sequences (text ending in
    U+FFFD) are held back until complete. The window always starts at a non-special token (or at the very
    beginning), so the concatenation of all pushes plus `flush()` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.special = tokenizer.special_ids
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window (left context)
        self.read = 0  # ids before this were emitted

    def _window_texts(self) -> tuple[str, str]:
        return self.tok.decode(self.ids[self.prefix : self.read]), self.tok.decode(self.ids[self.prefix :])

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text, text = self._window_texts()
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix = self.read
        while self.prefix > 0 and self.ids[self.prefix] in self.special:
            self.prefix -= 1
        self.read = len(self.ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text, text = self._window_texts()
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text) :]


class Tokenizer:
    """Common interface. Subclasses implement `_encode_text`, `decode`, `token_to_id` and set the ids."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    vocab_size: int = 0
    add_bos: bool = True  # whether prompts for this model start with BOS
    chat_template: str = "alpaca"  # name of the default template (see `render_chat`)
    special_ids: frozenset[int] = frozenset()  # ids that `decode` skips
    path: str = ""

    def _finish_init(self, pad_id: int | None = None) -> None:
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        stop = {self.eos_id} if self.eos_id is not None else set()
        for t in STOP_TOKENS:
            i = self.token_to_id(t)
            if i is not None:
                stop.add(i)
        self.stop_ids: set[int] = stop

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_text(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------ SentencePiece-style score BPE
class ScoreBPETokenizer(Tokenizer):
    """SentencePiece-BPE by piece scores, as llama2.c's `encode` and llama.cpp's SPM tokenizer do it.

    Prepend a dummy-prefix space, split into code points (unknown ones fall back to `<0xXX>` byte tokens), then
    repeatedly merge the adjacent pair whose concatenation is a piece with the highest score (leftmost on ties).
    `pieces` hold real spaces (not U+2581). Decoding concatenates piece bytes (byte tokens as raw bytes), skips
    control tokens and strips the leading space of the text like SentencePiece (llama2.c strips it after BOS).
    """

    def __init__(
        self,
        pieces: list[bytes],
        scores: list[float],
        *,
        bos_id: int | None,
        eos_id: int | None,
        control: set[int],
        unk_id: int | None = 0,
        add_space_prefix: bool = True,
        path: str = "",
        pad_id: int | None = None,
    ):
        self.path = path
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_space_prefix = add_space_prefix
        self.byte_ids: dict[int, int] = {}
        self._bytes: list[bytes] = []
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.match(p.decode("latin-1"))
            if m and i not in control:
                self.byte_ids.setdefault(int(m.group(1), 16), i)
                self._bytes.append(bytes([int(m.group(1), 16)]))
            else:
                self._bytes.append(b"" if i in control or i == unk_id else p)
        skip = set(control) | ({unk_id} if unk_id is not None else set())
        self.special_ids = frozenset(skip)
        self.vocab: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            if i not in skip:
                self.vocab.setdefault(p, i)
        self._finish_init(pad_id)

    def token_to_id(self, token: str) -> int | None:
        b = token.replace("\u2581", " ").encode()
        i = self.vocab.get(b)
        if i is None:
            i = next((j for j, p in enumerate(self.pieces) if p == b), None)
        return i

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        if self.add_space_prefix:
            text = " " + text
        vocab = self.vocab
        toks: list[int] = []
        for ch in text:
            b = ch.encode()
            i = vocab.get(b)
            if i is not None:
                toks.append(i)
            else:
                toks.extend(self.byte_ids[x] if x in self.byte_ids else self.unk_id for x in b)
        n = len(toks)
        strs = [self.pieces[t] for t in toks]
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, bytes, bytes]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                m = vocab.get(strs[i] + strs[j])
                if m is not None:
                    heapq.heappush(heap, (-self.scores[m], i, strs[i], strs[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or strs[i] != left or strs[j] != right:
                continue  # stale entry
            strs[i] = left + right
            toks[i] = vocab[strs[i]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t, a in zip(toks, alive) if a]

    def decode(self, ids: Sequence[int]) -> str:
        text = b"".join(self._bytes[i] for i in ids if 0 <= i < self.vocab_size).decode("utf-8", errors="replace")
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text


def _load_llama2c(path: Path) -> ScoreBPETokenizer:
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for a llama2.c tokenizer.bin; check the file")
    pieces: list[bytes] = []
    scores: list[float] = []
    off = 4
    try:
        while off < len(data):
            score, n = struct.unpack_from("<fi", data, off)
            if n < 0 or off + 8 + n > len(data):
                raise struct.error("bad length")
            pieces.append(data[off + 8 : off + 8 + n])
            scores.append(score)
            off += 8 + n
    except struct.error as e:
        raise ValueError(f"{path}: truncated or corrupt llama2.c tokenizer.bin at byte {off}; re-export it") from e
    if len(pieces) < 259:
        raise ValueError(
            f"{path}: only {len(pieces)} tokens; a llama2.c tokenizer.bin has <unk>, <s>, </s> and 256 "
            "byte tokens first"
        )
    tok = ScoreBPETokenizer(pieces, scores, bos_id=1, eos_id=2, control={1, 2}, unk_id=0, path=str(path))
    tok.add_bos = True
    return tok


# ---------------------------------------------------------------------------------------- SentencePiece .model
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (LLaMA 1/2); encoding by the `sentencepiece` library."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = str(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a readable SentencePiece model ({e}); check the file") from e
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        skip = set()
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                skip.add(i)
                self._bytes.append(b"")
            elif sp.is_byte(i):
                self._bytes.append(bytes([int(piece[3:5], 16)]))
            else:
                self._bytes.append(piece.replace("\u2581", " ").encode())
        self.special_ids = frozenset(skip)
        pad = sp.pad_id()
        self._finish_init(pad if pad >= 0 else None)

    def _encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        text = b"".join(self._bytes[i] for i in ids if 0 <= i < self.vocab_size).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None


# -------------------------------------------------------------------------------- Hugging Face `tokenizers`
class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from a GGUF byte-level BPE vocabulary)."""

    def __init__(
        self,
        tok: Any,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str = "alpaca",
        path: str = "",
    ):
        self.tok = tok
        self.path = path
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(special | {i for i in (bos_id, eos_id) if i is not None})
        self._finish_init(pad_id)

    def _encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self.special_ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def _template_name(jinja: str | None) -> str:
    return "chatml" if jinja and "<|im_start|>" in jinja else "alpaca"


def _token_content(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _load_hf(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as _Tok

    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json in this directory; pass the tokenizer file itself or "
            "a Hugging Face model directory that has one"
        )
    try:
        tok = _Tok.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception
        raise ValueError(
            f"{file}: not a valid Hugging Face tokenizer.json ({e}); re-save it with `tokenizer.save(...)`"
        ) from e
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
        f = directory / name
        if f.exists():
            try:
                cfg.update(json.loads(f.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e}); fix or delete it") from e

    def tid(key: str, guesses: tuple[str, ...]) -> int | None:
        name = _token_content(cfg.get(key))
        if name is not None:
            return tok.token_to_id(name)
        return next((tok.token_to_id(g) for g in guesses if tok.token_to_id(g) is not None), None)

    bos = tid("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))
    eos = tid("eos_token", ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"))
    pad = tid("pad_token", ())
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # the post-processor template of e.g. Llama 3 adds BOS
        pp = json.dumps(json.loads(tok.to_str()).get("post_processor"))
        add_bos = bos is not None and tok.id_to_token(bos) is not None and json.dumps(tok.id_to_token(bos)) in pp
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return HFTokenizer(
        tok, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, chat_template=_template_name(template), path=str(path)
    )


# ----------------------------------------------------------------------------------------------------- GGUF
def read_gguf_metadata(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """Key/value metadata of a GGUF file (v2/v3, little-endian), keys filtered by `prefix`.

    Reads only the header, not the tensor index: `gguf.GGUFReader` builds a numpy view per array element and
    takes ~6 s on SmolLM2's 49k-token vocabulary; this takes a fraction of a second. Numeric arrays come back as
    numpy arrays, string arrays as lists of str.
    """
    import numpy as np
    from gguf import GGUFValueType as T

    scalar = {
        T.UINT8: "B",
        T.INT8: "b",
        T.UINT16: "H",
        T.INT16: "h",
        T.UINT32: "I",
        T.INT32: "i",
        T.FLOAT32: "f",
        T.BOOL: "?",
        T.UINT64: "Q",
        T.INT64: "q",
        T.FLOAT64: "d",
    }
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported; convert it with a recent llama.cpp")
        off = 24

        def read_str() -> str:
            nonlocal off
            (n,) = struct.unpack_from("<Q", buf, off)
            s = buf[off + 8 : off + 8 + n].decode("utf-8", errors="replace")
            off += 8 + n
            return s

        def read_value(t: int) -> Any:
            nonlocal off
            if t == T.STRING:
                return read_str()
            if t == T.ARRAY:
                it, count = struct.unpack_from("<IQ", buf, off)
                off += 12
                if it == T.STRING:
                    return [read_str() for _ in range(count)]
                if it in scalar:
                    dt = np.dtype("<" + scalar[it]) if it != T.BOOL else np.dtype(bool)
                    arr = np.frombuffer(buf, dtype=dt, count=count, offset=off).copy()
                    off += dt.itemsize * count
                    return arr
                return [read_value(it) for _ in range(count)]
            fmt = "<" + scalar[T(t)]
            (v,) = struct.unpack_from(fmt, buf, off)
            off += struct.calcsize(fmt)
            return v

        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_str()
            (t,) = struct.unpack_from("<I", buf, off)
            off += 4
            value = read_value(t)
            if key.startswith(prefix):
                out[key] = value
    return out


# llama.cpp `tokenizer.ggml.pre` names -> pre-tokenizer recipe
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _gguf_pretokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

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


def _load_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path, prefix="tokenizer.")
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{path}: this GGUF has no embedded tokenizer (tokenizer.ggml.*); pass a tokenizer file")
    types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else [int(t) for t in types]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    template = _template_name(meta.get("tokenizer.chat_template"))
    # token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    if model == "gpt2":
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as _Tok

        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = _Tok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _gguf_pretokenizer(str(meta.get("tokenizer.ggml.pre", "gpt2")))
        tok.decoder = decoders.ByteLevel()
        added = [
            AddedToken(t, special=types[i] == 3, normalized=False) for i, t in enumerate(tokens) if types[i] in (3, 4)
        ]
        tok.add_tokens(added)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        return HFTokenizer(
            tok, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, chat_template=template, path=str(path)
        )
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        scores = [0.0] * len(tokens) if scores is None else [float(s) for s in scores]
        pieces = [t.replace("\u2581", " ").encode() for t in tokens]
        control = {i for i, t in enumerate(types) if t in (3, 5)}
        unk = next((i for i, t in enumerate(types) if t == 2), meta.get("tokenizer.ggml.unknown_token_id"))
        tok = ScoreBPETokenizer(
            pieces,
            scores,
            bos_id=bos,
            eos_id=eos,
            control=control,
            unk_id=unk,
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            path=str(path),
            pad_id=pad,
        )
        tok.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        tok.chat_template = template
        return tok
    raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported; supported: 'gpt2', 'llama'")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer; the format is picked from the file name/extension (see SUPPORTED_FORMATS)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}; pass a path to one of: {', '.join(SUPPORTED_FORMATS)}")
    if p.is_dir() or p.suffix == ".json":
        return _load_hf(p)
    if p.suffix == ".gguf":
        return _load_gguf(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".bin":
        return _load_llama2c(p)
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return _load_gguf(p)
    raise ValueError(f"{p}: unknown tokenizer format; supported: {', '.join(SUPPORTED_FORMATS)}")


# ---------------------------------------------------------------------------------------------- templates
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = ("alpaca", "chatml", "plain")
TURN_END = {"alpaca": "", "chatml": "<|im_end|>", "plain": ""}  # text closing an assistant turn


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (with the `### Input:` block only when `input` is non-empty)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render_chat(messages: list[dict], template: str, add_generation_prompt: bool = True) -> str:
    """Render `[{"role", "content"}, ...]` as prompt text.

    - "chatml": `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, as SmolLM2's GGUF jinja template does,
      including its default system message (SMOLLM2_SYSTEM) when the first message is not a system one;
      generation prompt `<|im_start|>assistant\\n`.
    - "alpaca": the first user turn is `alpaca_prompt(content)` (a system message, if any, replaces the preamble
      sentence); each assistant answer follows its `### Response:\\n` header, and later user turns add
      `\\n\\n### Instruction:\\n{content}\\n\\n### Response:\\n`. A user turn always ends with the response header,
      so `add_generation_prompt` changes nothing.
    - "plain": each message's content followed by a newline (roles are dropped).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat message {m!r} needs 'role' and 'content' keys")
    if template == "plain":
        return "".join(f"{m['content']}\n" for m in messages)
    if template == "chatml":
        out = []
        if messages and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n")
        out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)
    out = []
    system = None
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system = content
        elif role == "user":
            if not out:
                p = alpaca_prompt(content)
                if system is not None:
                    p = system + p[p.index("\n\n### Instruction:") :]
                out.append(p)
            else:
                out.append(f"\n\n### Instruction:\n{content}\n\n### Response:\n")
        elif role == "assistant":
            out.append(content)
        else:
            raise ValueError(f"unknown chat role {role!r}; use system, user or assistant")
    return "".join(out)
