"""The prompt/response boundary, loss masks, BOS/EOS handling and truncation."""

from __future__ import annotations

import copy
import itertools

import pytest

from alignlab.data.templates import render_alpaca_prompt, render_chat
from alignlab.data.tokenize import (
    IGNORE_INDEX,
    LONGER_THAN_MAX_LENGTH,
    PROMPT_FILLS_MAX_LENGTH,
    DataReport,
    TokenizedExample,
    adds_bos,
    common_prefix_length,
    encode_conversation,
    encode_pretraining_text,
    encode_prompt,
    encode_prompt_completion,
    encode_text,
    truncate_example,
)
from alignlab.errors import AlignlabError
from alignlab.models import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2 tokenizer: from the converted cache when present, else straight from the GGUF."""
    from alignlab.models import SMOLLM2, cache_dir, smollm2_gguf_path

    if (cache_dir() / "models" / SMOLLM2).is_dir():
        return load_tokenizer(SMOLLM2)
    try:
        gguf = smollm2_gguf_path()
    except AlignlabError as error:
        pytest.skip(str(error))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def with_bos(tiny):
    """The tiny tokenizer changed to prepend BOS (<|im_start|>) by itself, like Llama 2."""
    from tokenizers import processors

    tokenizer = copy.deepcopy(tiny)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tiny.bos_token_id)]
    )
    assert adds_bos(tokenizer) and not adds_bos(tiny)
    return tokenizer


def loss_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decode each run of loss-bearing tokens."""
    assert len(input_ids) == len(labels)
    for token, label in zip(input_ids, labels):
        assert label in (IGNORE_INDEX, token)
    runs = itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [tokenizer.decode([token for token, _ in run]) for has_loss, run in runs if has_loss]


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_alpaca_mask_is_exact(request, name) -> None:
    tokenizer = request.getfixturevalue(name)
    prompt_ids, completion_ids = encode_prompt_completion(
        tokenizer, {"instruction": "Add the numbers.", "input": "2 and 3"}, "The sum is 5.", template="alpaca"
    )
    assert tokenizer.decode(prompt_ids) == render_alpaca_prompt("Add the numbers.", "2 and 3")
    assert tokenizer.decode(completion_ids) == "The sum is 5." + tokenizer.eos_token
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert completion_ids.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_chat_mask_ends_at_end_of_turn(request, name) -> None:
    tokenizer = request.getfixturevalue(name)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, messages, "It is 4.", template="chat")
    assert tokenizer.decode(prompt_ids) == render_chat(tokenizer, messages, add_generation_prompt=True)
    # <|im_end|> is the EOS; the "\n" the template writes after it carries no loss and is not kept.
    assert tokenizer.decode(completion_ids) == "It is 4.<|im_end|>"
    assert completion_ids[-1] == tokenizer.eos_token_id
    # a string prompt is one user message
    assert encode_prompt_completion(tokenizer, "What is 2+2?", "It is 4.", template="chat") == (
        prompt_ids,
        completion_ids,
    )
    assert encode_prompt(tokenizer, messages, template="chat") == prompt_ids


@pytest.mark.parametrize(
    "prompt, completion",
    [("Answer: ", "Paris"), ("The capital of France is Par", "is."), ("Complete the word: hel", "lo world")],
)
def test_bpe_merge_across_the_boundary(smollm2, prompt, completion) -> None:
    whole = encode_text(smollm2, prompt + completion)
    naive = encode_text(smollm2, prompt) + encode_text(smollm2, completion)
    assert naive != whole  # a real merge crosses the boundary: tokenizing the parts apart is wrong
    prompt_ids, completion_ids = encode_prompt_completion(smollm2, prompt, completion, template="none")
    assert prompt_ids + completion_ids == whole + [smollm2.eos_token_id]
    assert smollm2.decode(prompt_ids) + smollm2.decode(completion_ids[:-1]) == prompt + completion
    # the merged token belongs to the response, so the prompt is a strict prefix of the prompt text
    assert prompt.startswith(smollm2.decode(prompt_ids)) and len(smollm2.decode(prompt_ids)) < len(prompt)
    assert common_prefix_length(encode_text(smollm2, prompt), whole) == len(prompt_ids)


def test_no_merge_keeps_the_whole_prompt(tiny) -> None:
    prompt_ids, completion_ids = encode_prompt_completion(tiny, "Question?\n", "Yes.", template="none")
    assert tiny.decode(prompt_ids) == "Question?\n"
    assert tiny.decode(completion_ids) == "Yes.<|im_end|>"


def test_eos_is_not_doubled(tiny) -> None:
    _, completion_ids = encode_prompt_completion(tiny, "Q: ", "A<|im_end|>", template="none")
    assert completion_ids.count(tiny.eos_token_id) == 1 and completion_ids[-1] == tiny.eos_token_id


@pytest.mark.parametrize("template", ["none", "alpaca", "chat"])
def test_unfinished_response_has_no_eos(tiny, template) -> None:
    """A response cut at a sampler's limit is its text alone: the finished encoding minus its final EOS (for
    chat: minus the template's end of turn), the prompt unchanged."""
    prompt, text = "Say something long.", "It was a dark and stormy"
    prompt_f, finished = encode_prompt_completion(tiny, prompt, text, template=template)
    prompt_u, unfinished = encode_prompt_completion(tiny, prompt, text, template=template, finished=False)
    assert prompt_u == prompt_f and finished[-1] == tiny.eos_token_id
    assert unfinished == finished[:-1] and tiny.eos_token_id not in unfinished
    assert tiny.decode(unfinished).strip() == text


def test_bos_added_once(with_bos) -> None:
    bos = with_bos.bos_token_id
    prompt_ids, completion_ids = encode_prompt_completion(with_bos, "Say hi.", "Hi!", template="alpaca")
    assert prompt_ids[0] == bos and prompt_ids[1] != bos
    assert bos not in completion_ids
    # the ChatML template already starts with <|im_start|> (this tokenizer's BOS): not doubled
    chat_prompt, _ = encode_prompt_completion(with_bos, "Say hi.", "Hi!", template="chat")
    assert chat_prompt[:2] != [bos, bos]
    input_ids, labels = encode_conversation(with_bos, CONVERSATION)
    assert input_ids[:2] != [bos, bos] and labels[0] == IGNORE_INDEX
    ids, labels = encode_pretraining_text(with_bos, "Hello world")
    assert ids[0] == bos and ids[-1] == with_bos.eos_token_id and labels == ids


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_multi_turn_loss_only_on_assistant_turns(request, name) -> None:
    tokenizer = request.getfixturevalue(name)
    input_ids, labels = encode_conversation(tokenizer, CONVERSATION)
    assert input_ids == encode_text(tokenizer, render_chat(tokenizer, CONVERSATION))
    assert loss_runs(tokenizer, input_ids, labels) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    no_loss = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])
    assert "Be nice." in no_loss and "Hi" in no_loss and "Bye" in no_loss and "Hello!" not in no_loss


def test_single_turn_conversation_matches_prompt_completion(tiny) -> None:
    messages = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "there, friend"}]
    input_ids, labels = encode_conversation(tiny, messages)
    prompt_ids, completion_ids = encode_prompt_completion(
        tiny, messages[:1], "there, friend", template="chat"
    )
    assert input_ids[: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
    assert (
        labels[: len(prompt_ids) + len(completion_ids)] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    )


def test_conversation_errors(tiny) -> None:
    with pytest.raises(AlignlabError, match="no assistant turn"):
        encode_conversation(tiny, [{"role": "user", "content": "Hi"}])
    with pytest.raises(AlignlabError, match="starts with an assistant turn"):
        encode_conversation(tiny, [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}])
    with pytest.raises(AlignlabError, match="unknown template"):
        encode_prompt_completion(tiny, "x", "y", template="vicuna")


def test_truncation_policies() -> None:
    example = TokenizedExample(input_ids=[1, 2, 3, 4, 5, 6], labels=[-100, -100, 3, 4, 5, 6], record=7)
    kept, reason = truncate_example(example, max_length=6)
    assert kept is example and reason is None
    kept, reason = truncate_example(example, max_length=4, truncation="right")
    assert reason is None and kept.input_ids == [1, 2, 3, 4] and kept.labels == [-100, -100, 3, 4]
    assert kept.truncated and kept.record == 7
    assert truncate_example(example, max_length=4, truncation="drop") == (None, LONGER_THAN_MAX_LENGTH)
    assert truncate_example(example, max_length=2, truncation="right") == (None, PROMPT_FILLS_MAX_LENGTH)
    assert truncate_example(example, max_length=2, truncation="drop") == (None, PROMPT_FILLS_MAX_LENGTH)
    with pytest.raises(AlignlabError, match="unknown truncation"):
        truncate_example(example, max_length=2, truncation="left")


def test_data_report_summary() -> None:
    report = DataReport(source="d.jsonl", records_read=5, max_length=8)
    report.keep(TokenizedExample([1, 2, 3], [-100, 2, 3], 1, truncated=True))
    report.keep(TokenizedExample([1, 2], [-100, 2], 2))
    report.drop(PROMPT_FILLS_MAX_LENGTH)
    report.skip("empty response", "d.jsonl: record 4: field 'output': output is empty")
    report.skip("empty response", "d.jsonl: record 5: field 'output': output is empty")
    summary = report.summary()
    assert "5 records read, 2 examples kept (5 tokens, 3 with loss)" in summary
    assert "truncated (max_length 8): 1" in summary
    assert "dropped: 1 (prompt fills max_length: 1)" in summary
    assert "skipped invalid: 2 (empty response: 2)" in summary
    assert "record 4" in summary
