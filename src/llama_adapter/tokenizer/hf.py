"""Hugging Face `tokenizers` tokenizers: tokenizer.json (+ tokenizer_config.json / special_tokens_map.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Tok

from ..checkpoint.common import chat_template_name, one_line, read_json
from .base import Tokenizer


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
        chat_template: str | None = None,
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


def template_name(jinja: str | None) -> str | None:
    """The prompt template (see `render_chat`) a tokenizer's jinja chat template asks for; None when
    the file declares none we can render (the loader then picks one by purpose)."""
    return "chatml" if chat_template_name(jinja) == "chatml" else None


def _configs(directory: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins
        if (directory / name).exists():
            cfg.update(read_json(directory / name))
    for key in ("bos_token", "eos_token", "pad_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{directory}: {key} is {v!r} in the tokenizer configs, expected a token string")
        cfg[key] = v
    return cfg


def _chat_template(cfg: dict[str, Any]) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load_hf(path: Path) -> HFTokenizer:
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
            f"{file}: not a valid Hugging Face tokenizer.json ({one_line(e)}); re-save it with `tokenizer.save(...)`"
        ) from e
    cfg = _configs(directory)

    def tid(key: str, guesses: tuple[str, ...]) -> int | None:
        if cfg[key] is not None:
            return tok.token_to_id(cfg[key])
        return next((tok.token_to_id(g) for g in guesses if tok.token_to_id(g) is not None), None)

    bos = tid("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))
    eos = tid("eos_token", ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"))
    pad = tid("pad_token", ())
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:  # the post-processor template of e.g. Llama 3 adds BOS
        pp = json.dumps(json.loads(tok.to_str()).get("post_processor"))
        add_bos = bos is not None and tok.id_to_token(bos) is not None and json.dumps(tok.id_to_token(bos)) in pp
    return HFTokenizer(
        tok, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, chat_template=template_name(_chat_template(cfg)),
        path=str(path),
    )  # fmt: skip
