"""A conversation with a model: history, an attached image, slash commands. The terminal loop in
cli.py only reads lines and prints; everything a chat does lives here, so it is testable and the
server's web page and the CLI agree on what a turn is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .generate import encode_prompts, make_rows, run_rows, stop_ids_of
from .loading import Stack
from .multimodal import open_image
from .sampling import SamplingParams
from .tokenizer import render_chat

CHAT_HELP = (
    "commands: /image PATH  attach an image (it conditions the whole conversation from the next turn on)\n"
    "          /image none  detach it\n"
    "          /reset       forget the conversation (the image stays)\n"
    "          /help        this text; an empty line or Ctrl-D quits"
)
NO_IMAGE = ("none", "-")


class ChatSession:
    """One conversation with adapter `name` of a `Stack` (None = the frozen base)."""

    def __init__(self, stack: Stack, name: str | None, params: SamplingParams, *, compile: bool = False) -> None:
        self.stack, self.name, self.params, self.compile = stack, name, params, compile
        self.history: list[dict[str, str]] = []
        self.image: str | None = None
        self._prompt: Any = None  # the row prompt state, rebuilt when the image changes
        self.template = stack.template_of(name)
        if self.template == "plain":  # a conversation needs turns
            self.template = "chatml"
        self.set_image(None)

    def set_image(self, path: str | None) -> None:
        """Attach (or with None detach) an image; ValueError/OSError leave the previous one."""
        image = None if path is None else open_image(path)  # names the file in its error
        self._prompt = self.stack.row_prompt(self.name, image)
        self.image = path

    def command(self, line: str) -> str | None:
        """Run a /command; returns the message to show, or None when `line` is not a command."""
        cmd, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if cmd == "/help":
            return CHAT_HELP
        if cmd == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        if cmd != "/image":
            return None
        if not rest:
            return f"(image: {self.image or 'none'}; /image PATH attaches one, /image none detaches it)"
        if rest.lower() in NO_IMAGE:
            self.set_image(None)
            return "(image detached)"
        self.set_image(rest)
        return f"(image attached: {self.image})"

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
