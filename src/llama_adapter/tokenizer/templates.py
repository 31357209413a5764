"""Chat and instruction prompt templates (Alpaca, ChatML as SmolLM2 ships it, plain)."""

from __future__ import annotations

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
