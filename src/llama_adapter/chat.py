"""A conversation with a model: history, an attached input (image, audio, video or point cloud),
slash commands. The terminal loop in cli.py only reads lines and prints; everything a chat does
lives here, so it is testable and the server's web page and the CLI agree on what a turn is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .generate import encode_prompts, make_rows, run_rows, stop_ids_of
from .loading import Stack
from .multimodal import MODALITIES, NONE_WORDS, Input, read_input
from .sampling import SamplingParams
from .tokenizer import render_chat

CHAT_HELP = (
    "commands: /image PATH  attach an image (it conditions the whole conversation from the next turn on)\n"
    "          /audio PATH, /video PATH, /points PATH  the same for audio, a video (or frame folder), a point\n"
    "                       cloud, for an adapter built for them; one input at a time, the last one wins\n"
    "          /image none  detach it (any of the four)\n"
    "          /reset       forget the conversation (the input stays)\n"
    "          /help        this text; an empty line or Ctrl-D quits"
)
NO_IMAGE = NONE_WORDS


class ChatSession:
    """One conversation with adapter `name` of a `Stack` (None = the frozen base)."""

    def __init__(self, stack: Stack, name: str | None, params: SamplingParams, *, compile: bool = False) -> None:
        self.stack, self.name, self.params, self.compile = stack, name, params, compile
        self.history: list[dict[str, str]] = []
        self.input: Input | None = None
        self._prompt: Any = None  # the row prompt state, rebuilt when the input changes
        self.template = stack.template_of(name)
        if self.template == "plain":  # a conversation needs turns
            self.template = "chatml"
        self.set_input(None)

    @property
    def image(self) -> str | None:
        """The attached image's path (None: no image attached)."""
        return self.input.source if self.input is not None and self.input.modality == "image" else None

    def set_input(self, modality: str | None, path: str | None = None) -> None:
        """Attach a file of `modality` (or with None detach the input); ValueError/OSError (naming the
        file, or the modalities the model takes) leave the previous one attached."""
        if modality is not None:
            self.stack.check_input(self.name, modality)  # before reading: a wrong kind needs no decoding
        inp = None if modality is None else read_input(modality, path)
        self._prompt = self.stack.row_prompt(self.name, inp)
        self.input = inp

    def set_image(self, path: str | None) -> None:
        self.set_input(None if path is None else "image", path)

    def command(self, line: str) -> str | None:
        """Run a /command; returns the message to show, or None when `line` is not a command."""
        cmd, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if cmd == "/help":
            return CHAT_HELP
        if cmd == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        modality = cmd[1:]
        if not cmd.startswith("/") or modality not in MODALITIES:
            return None
        was = self.input
        if not rest:
            current = "none" if was is None else was.label
            return f"(attached: {current}; /{modality} PATH attaches one, /{modality} none detaches it)"
        if rest.lower() in NONE_WORDS:
            self.set_input(None)
            return "(nothing was attached)" if was is None else f"({was.modality} detached)"
        self.set_input(modality, rest)
        return f"({modality} attached: {rest})"

    def reply(self, text: str, on_text: Callable[[str], Any] | None = None) -> str:
        """Add a user turn, generate the assistant's answer (streamed to `on_text`), keep both."""
        self.history.append({"role": "user", "content": text})
        prompt = render_chat(self.history, self.template, add_generation_prompt=True)
        tok = self.stack.tokenizer
        rows = make_rows(encode_prompts(tok, [prompt]), self.params, stop_ids=stop_ids_of(tok), tokenizer=tok)
        rows[0].prompt = self._prompt
        if on_text is not None:
            rows[0].on_text = lambda row, delta: on_text(delta)
        answer = run_rows(self.stack.model, rows, compile=self.compile)[0].text
        self.history.append({"role": "assistant", "content": answer})
        return answer
