"""Templates render byte-exactly: Alpaca against literal strings, chat through the tokenizer's template."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from alignlab.data.templates import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    alpaca_user_message,
    check_messages,
    render_alpaca_prompt,
    render_chat,
    render_prompt,
)
from alignlab.errors import AlignlabError
from alignlab.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny-random")


def test_alpaca_templates_are_stanford_alpaca_byte_for_byte() -> None:
    assert ALPACA_PROMPT_WITH_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:\n"
    )
    assert ALPACA_PROMPT_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def test_render_alpaca_prompt() -> None:
    assert render_alpaca_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n"
    )
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert render_alpaca_prompt("Say hi.") == expected
    assert render_alpaca_prompt("Say hi.", "") == expected


def test_render_alpaca_keeps_braces_literally() -> None:
    text = render_alpaca_prompt("Fill {input} and {instruction} in {0}", "{x}")
    assert "### Instruction:\nFill {input} and {instruction} in {0}\n\n### Input:\n{x}\n\n" in text


def test_render_chat_chatml(tiny) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert render_chat(tiny, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert render_chat(tiny, messages[:2], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_chat_template_is_a_clear_error() -> None:
    tokenizer = SimpleNamespace(chat_template=None, name_or_path="plain-gpt2")
    with pytest.raises(AlignlabError, match="has no chat template") as info:
        render_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    assert "plain-gpt2" in str(info.value) and info.value.field == "template"


def test_render_prompt_variants(tiny) -> None:
    assert render_prompt(tiny, "raw text", "none") == "raw text"
    assert render_prompt(tiny, "Say hi.", "alpaca") == render_alpaca_prompt("Say hi.")
    assert render_prompt(tiny, {"instruction": "Add", "input": "1, 2"}, "alpaca") == render_alpaca_prompt(
        "Add", "1, 2"
    )
    assert render_prompt(tiny, "Hi", "chat") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tiny, {"instruction": "Add", "input": "1, 2"}, "chat") == (
        "<|im_start|>user\nAdd\n\n1, 2<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(AlignlabError, match="unknown template"):
        render_prompt(tiny, "x", "vicuna")
    with pytest.raises(AlignlabError, match="string prompt"):
        render_prompt(tiny, [{"role": "user", "content": "x"}], "none")


def test_alpaca_user_message() -> None:
    assert alpaca_user_message("Do it.") == "Do it."
    assert alpaca_user_message("Do it.", "with this") == "Do it.\n\nwith this"


@pytest.mark.parametrize(
    "messages, field",
    [
        ("hello", "messages"),
        ([], "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ],
)
def test_check_messages_names_the_field(messages, field) -> None:
    with pytest.raises(AlignlabError) as info:
        check_messages(messages)
    assert info.value.field == field
