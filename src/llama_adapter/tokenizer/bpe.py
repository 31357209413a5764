"""SentencePiece-style BPE by piece scores (llama2.c, llama.cpp's SPM) and llama2.c's tokenizer.bin."""

from __future__ import annotations

import heapq
import re
import struct
from collections.abc import Sequence
from pathlib import Path

from .base import Tokenizer

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>\Z")


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
            m = BYTE_PIECE.match(p.decode("latin-1"))
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
                # without byte pieces or <unk> (a vocabulary that cannot spell it) the byte is dropped
                toks.extend(
                    self.byte_ids.get(x, self.unk_id) for x in b if x in self.byte_ids or self.unk_id is not None
                )
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


def load_llama2c(path: Path) -> ScoreBPETokenizer:
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


def write_llama2c(tok: ScoreBPETokenizer, path: Path) -> None:
    """Write `tok` as a llama2.c tokenizer.bin, which assumes <unk>=0, <s>=1, </s>=2 as the only
    special pieces and a dummy-prefix space; a vocabulary that differs cannot be written."""
    if (tok.unk_id, tok.bos_id, tok.eos_id, tok.special_ids, tok.add_space_prefix) != (0, 1, 2, {0, 1, 2}, True):
        raise ValueError(
            f"{tok.path}: this SentencePiece-style vocabulary has other special tokens than llama2.c's "
            "<unk>=0, <s>=1, </s>=2; it cannot be written as tokenizer.bin"
        )
    body = b"".join(struct.pack("<fi", score, len(p)) + p for p, score in zip(tok.pieces, tok.scores))
    path.write_bytes(struct.pack("<i", max(map(len, tok.pieces), default=0)) + body)
