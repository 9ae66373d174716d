"""Prompt templates: the Stanford Alpaca templates, byte for byte, and chat rendering through the tokenizer.

Alpaca (https://github.com/tatsu-lab/stanford_alpaca, ``train.py``, ``PROMPT_DICT``) has two prompts, one for
records with an ``input`` and one without; the response follows ``### Response:\\n`` directly.

Chat rendering goes through ``tokenizer.apply_chat_template`` (the model's own Jinja template) and returns
text; tokenization lives in :mod:`alignlab.data.tokenize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from alignlab.errors import AlignlabError

__all__ = [
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_ROLES",
    "render_alpaca_prompt",
    "alpaca_user_message",
    "alpaca_input",
    "has_chat_template",
    "require_chat_template",
    "check_messages",
    "render_chat",
    "render_prompt",
]

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

CHAT_ROLES = ("system", "user", "assistant", "tool")


def render_alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """The Alpaca prompt for one record: the with-input template when ``input`` is non-empty, else the
    no-input template. The response text follows the returned string directly.

    The fields are spliced in literally (no ``str.format``), so braces in the text are kept as they are.
    """
    if input:
        head, rest = ALPACA_PROMPT_WITH_INPUT.split("{instruction}")
        middle, tail = rest.split("{input}")
        return head + instruction + middle + input + tail
    head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    return head + instruction + tail


def alpaca_user_message(instruction: str, input: str = "") -> str:  # noqa: A002
    """The user turn for an Alpaca record rendered with a chat template: the instruction, then a blank line
    and the input when the input is non-empty."""
    return f"{instruction}\n\n{input}" if input else instruction


def alpaca_input(prompt: str) -> str:
    """The ``input`` of a prompt rendered with :data:`ALPACA_PROMPT_WITH_INPUT` (the text between ``### Input:``
    and ``### Response:``, surrounding newlines dropped), or ``prompt`` unchanged when it has no input section."""
    if "### Input:" not in prompt:
        return prompt
    return prompt.split("### Input:", 1)[1].split("### Response:", 1)[0].strip("\n")


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any) -> None:
    """Raise a clear :class:`AlignlabError` when the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise AlignlabError(
            f"the tokenizer of {name!r} has no chat template, so conversational data cannot be rendered; "
            "use template='alpaca' or template='none', or a model/tokenizer that ships a chat template",
            field="template",
        )


def check_messages(messages: Any, *, field: str = "messages") -> list[dict[str, str]]:
    """Validate a list of chat messages (``{role, content}`` with string values) and return plain dicts.

    Raises:
        AlignlabError: naming ``field`` (e.g. ``messages[2].content``) when a message is malformed.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise AlignlabError(f"expected a list of messages, found {type(messages).__name__}", field=field)
    if not messages:
        raise AlignlabError("the list of messages is empty", field=field)
    checked = []
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, Mapping):
            raise AlignlabError(f"a message must be an object, found {type(message).__name__}", field=where)
        for key in ("role", "content"):
            if key not in message:
                raise AlignlabError(f"the message has no '{key}'", field=f"{where}.{key}")
            if not isinstance(message[key], str):
                raise AlignlabError(
                    f"expected a string, found {type(message[key]).__name__}", field=f"{where}.{key}"
                )
        if message["role"] not in CHAT_ROLES:
            raise AlignlabError(
                f"unknown role {message['role']!r} (expected one of {', '.join(CHAT_ROLES)})",
                field=f"{where}.role",
            )
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
) -> str:
    """Render messages with the tokenizer's chat template, as text.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: append the header of an assistant turn (the prompt to generate from).

    Raises:
        AlignlabError: the tokenizer has no chat template, or the template fails on these messages.
    """
    require_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(
            [dict(message) for message in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # jinja errors (e.g. "roles must alternate") are user-facing data problems
        raise AlignlabError(
            f"the chat template failed on these messages: {error}", field="messages"
        ) from error
    if not isinstance(text, str):
        raise AlignlabError(f"apply_chat_template returned {type(text).__name__}, expected text")
    return text


def render_prompt(
    tokenizer: Any, prompt: str | Sequence[Mapping[str, str]] | Mapping[str, str], template: str
) -> str:
    """The text a model is given to generate a response to ``prompt``.

    Args:
        tokenizer: used for ``template="chat"`` only.
        prompt: a string; a list of chat messages (``template="chat"``); or, for ``template="alpaca"``, a
            mapping with ``instruction`` and optional ``input``.
        template: ``"alpaca"`` (the Alpaca prompt), ``"chat"`` (chat template plus generation prompt; a
            string becomes one user message), or ``"none"`` (the string as it is).
    """
    if template == "alpaca":
        if isinstance(prompt, Mapping):
            instruction, extra = prompt.get("instruction"), prompt.get("input") or ""
            if not isinstance(instruction, str) or not isinstance(extra, str):
                raise AlignlabError("expected string 'instruction' and 'input'", field="prompt")
            return render_alpaca_prompt(instruction, extra)
        if isinstance(prompt, str):
            return render_alpaca_prompt(prompt)
        raise AlignlabError(
            "the alpaca template takes a string prompt, not a list of messages", field="prompt"
        )
    if template == "chat":
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Mapping):
            text = alpaca_user_message(str(prompt.get("instruction", "")), str(prompt.get("input") or ""))
            messages = [{"role": "user", "content": text}]
        else:
            messages = check_messages(prompt, field="prompt")
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    if template == "none":
        if not isinstance(prompt, str):
            raise AlignlabError(
                "template 'none' takes a string prompt; use template 'chat' for messages", field="prompt"
            )
        return prompt
    raise AlignlabError(f"unknown template {template!r} (expected alpaca, chat or none)", field="template")
