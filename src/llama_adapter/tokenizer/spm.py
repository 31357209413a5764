"""SentencePiece `.model` files (LLaMA 1/2), encoded by the `sentencepiece` library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from ..checkpoint.common import one_line
from .base import Tokenizer
from .bpe import BYTE_PIECE


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (LLaMA 1/2); encoding by the `sentencepiece` library."""

    def __init__(self, path: Path):
        self.path = str(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
            self.special_ids = frozenset(self._read_vocabulary())
            pad = self.sp.pad_id()
            self._finish_init(pad if pad >= 0 else None)
        except (RuntimeError, OSError, UnicodeDecodeError) as e:  # what sentencepiece raises on a damaged model
            raise ValueError(f"{path}: not a readable SentencePiece model ({one_line(e)}); check the file") from e

    def _read_vocabulary(self) -> set[int]:
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
                m = BYTE_PIECE.match(piece)
                if m is None:
                    raise RuntimeError(f"byte piece {i} is {piece!r}, not <0xXX>")
                self._bytes.append(bytes([int(m.group(1), 16)]))
            else:
                self._bytes.append(piece.replace("\u2581", " ").encode())
        return skip

    def _encode_text(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        text = b"".join(self._bytes[i] for i in ids if 0 <= i < self.vocab_size).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None
