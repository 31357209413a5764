"""The interface every tokenizer implements, and streaming detokenisation."""

from __future__ import annotations

from collections.abc import Sequence

STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


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
    chat_template: str | None = None  # the chat template the file declares (see `render_chat`), if any
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
