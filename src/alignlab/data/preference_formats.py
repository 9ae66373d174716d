"""How each preference format is parsed into records.

Formats (``format=`` name, then the fields of one record; ``columns`` maps these names to a file's own):

``explicit``
    ``{prompt, chosen, rejected}``. Each is a string or a list of messages (``{role, content}``, or
    ShareGPT's ``{from, value}``). A ``chosen``/``rejected`` list ends with the assistant reply; the
    messages before it, if any, must repeat the prompt (as in UltraFeedback, where ``prompt`` is a string
    and ``chosen`` is ``[user, assistant]``). Optional: ``margin`` (Llama 2 style), ``score_chosen`` and
    ``score_rejected``.
``implicit``
    ``{chosen, rejected}`` with no prompt: two whole conversations sharing every turn but the last.
    Strings are Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): each is split at its
    LAST ``"\\n\\nAssistant:"``; the text before it becomes the prompt messages (Human -> user, Assistant
    -> assistant, every turn, contents stripped) and must be the same in both. Lists of messages are split
    before their last (assistant) message.
``sharegpt``
    ``{conversations: [{from: system/human/gpt, value}], chosen: {from: gpt, value}, rejected: ...}``
    (LLaMA-Factory). The conversation must end with a human turn.
``ranking``
    ``{prompt, responses}`` best first, or ``{prompt, responses, scores}`` (higher is better; responses
    are sorted by score, descending; equal scores are an error, since the order would be undefined).
    Optional ``unfinished``: a list of bools aligned with ``responses``, true for a response that was cut
    off at a sampler's token limit (as the lab's sampled answers are); such a response is encoded without
    EOS by the policy-training methods (DPO family), so they do not learn to stop where the sampler stopped.
``oasst``
    Open-Assistant message trees ``{message_tree_id, tree_state, prompt: Message}`` where a Message is
    ``{text, role: prompter/assistant, rank, replies: [Message]}``. Every prompter node with two or more
    ranked assistant replies gives one ranking: the prompt is the conversation from the root down to that
    node, the responses are the replies ordered by ``rank`` (0 = best). Replies whose ``rank`` is null or
    absent are not part of any ranking: where no sibling is ranked they are counted as skipped
    (``"oasst: unranked reply (no ranked sibling)"``); where siblings are ranked the node is ambiguous and
    is an error (with ``skip_invalid`` the unranked replies are counted as skipped and the ranked ones
    still form the ranking). Deleted messages and messages that failed review are skipped with their
    subtree. Conversations below an unranked reply are still walked.
``unpaired`` (for :func:`load_feedback`)
    ``{prompt, completion, label}`` or ``{messages, label}`` whose last message is the assistant
    completion. ``label`` is a bool (``0``/``1`` and the strings ``"true"``/``"false"``/``"0"``/``"1"`` are
    accepted, since CSV cells are strings).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from alignlab.data.preference_records import (
    FeedbackRecord,
    PreferenceRecord,
    PreferenceReport,
    Prompt,
)
from alignlab.errors import AlignlabError

CANONICAL_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "responses",
    "scores",
    "margin",
    "score_chosen",
    "score_rejected",
    "unfinished",
    "conversations",
    "messages",
    "completion",
    "label",
)
_ROLES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


class RecordError(AlignlabError):
    """A bad record: an :class:`AlignlabError` that also carries a short reason for the skip counter."""

    def __init__(self, reason: str, message: str, *, file: str, record: int, field: str | None) -> None:
        self.reason = reason
        super().__init__(message, file=file, record=record, field=field)


@dataclass
class ParseContext:
    """Where the record being parsed is, and how canonical field names map to the file's columns."""

    file: str
    record: int
    columns: dict[str, str]
    csv: bool
    report: PreferenceReport
    skip_invalid: bool

    def name(self, canonical: str) -> str:
        """The file's name for a canonical field (also for nested paths such as ``chosen[1].content``)."""
        head, sep, rest = canonical.partition(".")
        bracket = head.find("[")
        if bracket > 0:
            rest = head[bracket:] + sep + rest
            head, sep = head[:bracket], ""
        return self.columns.get(head, head) + sep + rest

    def fail(self, reason: str, message: str, field: str | None) -> RecordError:
        return RecordError(
            reason,
            message,
            file=self.file,
            record=self.record,
            field=None if field is None else self.name(field),
        )


# ----------------------------------------------------------------------------------------------- helpers


def _get(raw: dict[str, Any], key: str, ctx: ParseContext) -> Any:
    if key not in raw or raw[key] is None:
        raise ctx.fail("missing field", f"the field {ctx.name(key)!r} is missing", key)
    return raw[key]


def _text(value: Any, path: str, ctx: ParseContext, *, what: str = "response") -> str:
    if not isinstance(value, str):
        raise ctx.fail("wrong type", f"expected a string, got {_type_name(value)}", path)
    if not value.strip():
        raise ctx.fail(f"empty {what}", f"the {what} is empty", path)
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        list: "a list",
        dict: "an object",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _maybe_json(value: Any, ctx: ParseContext) -> Any:
    """CSV cells are strings: read a cell holding a JSON list or object as that list or object."""
    if ctx.csv and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _message(value: Any, path: str, ctx: ParseContext) -> dict[str, str]:
    """One message as ``{role, content}`` (``{from, value}`` and human/gpt/prompter roles accepted)."""
    if not isinstance(value, dict):
        raise ctx.fail("wrong type", f"a message must be an object, got {_type_name(value)}", path)
    role_key, content_key = (
        ("role", "content") if "role" in value or "content" in value else ("from", "value")
    )
    role = value.get(role_key)
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise ctx.fail(
            "bad role",
            f"unknown role {role!r}; expected one of {', '.join(sorted(_ROLES))}",
            f"{path}.{role_key}",
        )
    content = _text(value.get(content_key), f"{path}.{content_key}", ctx, what="message")
    return {"role": _ROLES[role.lower()], "content": content}


def _messages(value: Any, path: str, ctx: ParseContext) -> list[dict[str, str]]:
    value = _maybe_json(value, ctx)
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a list of messages, got {_type_name(value)}", path)
    if not value:
        raise ctx.fail("empty prompt", "the list of messages is empty", path)
    return [_message(item, f"{path}[{index}]", ctx) for index, item in enumerate(value)]


def _prompt(value: Any, path: str, ctx: ParseContext) -> Prompt:
    """A prompt: a non-empty string, or messages ending with a user turn."""
    value = _maybe_json(value, ctx)
    if isinstance(value, str):
        return _text(value, path, ctx, what="prompt")
    if isinstance(value, list):
        return _check_prompt_messages(_messages(value, path, ctx), path, ctx, role_key=_role_key(value))
    raise ctx.fail("wrong type", f"expected a string or a list of messages, got {_type_name(value)}", path)


def _check_prompt_messages(
    messages: list[dict[str, str]],
    path: str,
    ctx: ParseContext,
    *,
    indexed: bool = True,
    role_key: str = "role",
) -> list[dict[str, str]]:
    """Check prompt messages. Errors name ``path[i].role_key`` when ``indexed``, else ``path``."""
    if not messages:
        raise ctx.fail("empty prompt", "the prompt has no messages", path)
    if messages[-1]["role"] != "user":
        raise ctx.fail(
            "prompt does not end with a user turn",
            f"the prompt must end with a user turn, but its last message is from {messages[-1]['role']!r}",
            f"{path}[{len(messages) - 1}].{role_key}" if indexed else path,
        )
    if any(message["role"] == "system" for message in messages[1:]):
        ctx.report.notes["prompts with a system message after the first turn"] += 1
    if any(a["role"] == b["role"] for a, b in zip(messages, messages[1:])):
        ctx.report.notes["prompts with consecutive turns of the same role"] += 1
    return messages


def _role_key(raw: Any) -> str:
    """``"from"`` for ShareGPT-style message lists (``{from, value}``), else ``"role"``: for naming fields."""
    first = raw[0] if isinstance(raw, list) and raw else raw
    return "from" if isinstance(first, dict) and "role" not in first and "from" in first else "role"


def _reply(value: Any, path: str, ctx: ParseContext) -> tuple[list[dict[str, str]], str]:
    """A response: a string, a ``{from, value}``/``{role, content}`` object, or messages ending with the
    assistant reply. Returns (the messages before the reply, the reply text)."""
    value = _maybe_json(value, ctx)
    if isinstance(value, str):
        return [], _text(value, path, ctx)
    if isinstance(value, dict):
        value = [value]
        single = True
    else:
        single = False
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a string or messages, got {_type_name(value)}", path)
    if not value:
        raise ctx.fail("empty response", "the response has no messages", path)
    messages = [_message(item, path if single else f"{path}[{i}]", ctx) for i, item in enumerate(value)]
    last = messages[-1]
    last_path = path if single else f"{path}[{len(messages) - 1}]"
    if last["role"] != "assistant":
        raise ctx.fail(
            "response is not an assistant turn",
            f"the response must be an assistant turn, got {last['role']!r}",
            f"{last_path}.{'from' if 'from' in value[-1] else 'role'}",
        )
    return messages[:-1], last["content"]


def _distinct(responses: list[str], paths: list[str], ctx: ParseContext) -> None:
    seen: dict[str, int] = {}
    for index, text in enumerate(responses):
        key = text.strip()
        if key in seen:
            if len(responses) == 2:
                raise ctx.fail(
                    "chosen equals rejected", "chosen and rejected are the same text", paths[index]
                )
            raise ctx.fail(
                "identical responses",
                f"responses {seen[key] + 1} and {index + 1} (best first) are the same text",
                paths[index],
            )
        seen[key] = index


def _number(value: Any, path: str, ctx: ParseContext) -> float:
    if ctx.csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.fail("wrong type", f"expected a finite number, got {value!r}", path)
    return float(value)


def _optional_number(raw: dict[str, Any], key: str, ctx: ParseContext) -> float | None:
    value = raw.get(key)
    if value is None or (ctx.csv and value == ""):
        return None
    return _number(value, key, ctx)


# ------------------------------------------------------------------------------------------------ parsers


def _parse_explicit(raw: dict[str, Any], ctx: ParseContext) -> Iterator[PreferenceRecord]:
    prompt = _prompt(_get(raw, "prompt", ctx), "prompt", ctx)
    chosen_context, chosen = _reply(_get(raw, "chosen", ctx), "chosen", ctx)
    rejected_context, rejected = _reply(_get(raw, "rejected", ctx), "rejected", ctx)
    for context, key in ((chosen_context, "chosen"), (rejected_context, "rejected")):
        if not context:
            continue
        # chosen/rejected repeat the conversation (UltraFeedback style): it must be the prompt.
        # (a text prompt matches a conversation whose last turn is that text from the user)
        user_turn = {"role": "user", "content": prompt}
        same = context == prompt if isinstance(prompt, list) else context[-1] == user_turn
        if not same:
            raise ctx.fail(
                "prompt mismatch",
                f"the messages before the {key} reply are not the prompt",
                f"{key}[0]",
            )
    if chosen_context and rejected_context and chosen_context != rejected_context:
        raise ctx.fail("prompt mismatch", "chosen and rejected repeat different conversations", "rejected[0]")
    if isinstance(prompt, str) and (chosen_context or rejected_context):
        key = "chosen" if chosen_context else "rejected"
        prompt = _check_prompt_messages(
            chosen_context or rejected_context, key, ctx, role_key=_role_key(raw[key])
        )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    scores = None
    score_chosen = _optional_number(raw, "score_chosen", ctx)
    score_rejected = _optional_number(raw, "score_rejected", ctx)
    if (score_chosen is None) != (score_rejected is None):
        missing = "score_rejected" if score_rejected is None else "score_chosen"
        raise ctx.fail("missing field", "give both score_chosen and score_rejected, or neither", missing)
    if score_chosen is not None and score_rejected is not None:
        if score_chosen < score_rejected:
            raise ctx.fail(
                "scores contradict the labels",
                f"score_chosen ({score_chosen}) is below score_rejected ({score_rejected})",
                "score_chosen",
            )
        scores = [score_chosen, score_rejected]
    margin = _optional_number(raw, "margin", ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], scores, margin, ctx.record, ctx.file)


def _parse_implicit(raw: dict[str, Any], ctx: ParseContext) -> Iterator[PreferenceRecord]:
    chosen_raw = _maybe_json(_get(raw, "chosen", ctx), ctx)
    rejected_raw = _maybe_json(_get(raw, "rejected", ctx), ctx)
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        chosen_prompt, chosen = _split_transcript(chosen_raw, "chosen", ctx)
        rejected_prompt, rejected = _split_transcript(rejected_raw, "rejected", ctx)
        if chosen_prompt != rejected_prompt:
            raise ctx.fail(
                "prompt mismatch",
                "chosen and rejected do not share the conversation before their last Assistant turn",
                "rejected",
            )
        messages = _hh_messages(chosen_prompt, "chosen", ctx)
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        chosen_context, chosen = _reply(chosen_raw, "chosen", ctx)
        rejected_context, rejected = _reply(rejected_raw, "rejected", ctx)
        if not chosen_context:
            raise ctx.fail("missing field", "no prompt: give a prompt field or whole conversations", "prompt")
        if chosen_context != rejected_context:
            raise ctx.fail(
                "prompt mismatch",
                "chosen and rejected do not share the messages before the reply",
                "rejected",
            )
        messages = chosen_context
    else:
        bad = "chosen" if not isinstance(chosen_raw, (str, list)) else "rejected"
        raise ctx.fail(
            "wrong type",
            "without a prompt field, chosen and rejected must both be transcripts (strings) or both "
            f"lists of messages; got {_type_name(chosen_raw)} and {_type_name(rejected_raw)}",
            bad,
        )
    prompt = _check_prompt_messages(
        messages, "chosen", ctx, indexed=isinstance(chosen_raw, list), role_key=_role_key(chosen_raw)
    )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], None, None, ctx.record, ctx.file)


def _split_transcript(text: str, path: str, ctx: ParseContext) -> tuple[str, str]:
    """Split an HH transcript at its last ``"\\n\\nAssistant:"``: (the text before, the reply stripped)."""
    cut = text.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise ctx.fail(
            "no assistant turn",
            'the transcript has no "\\n\\nAssistant:" turn (expected "\\n\\nHuman: ...\\n\\nAssistant: ...")',
            path,
        )
    reply = text[cut + len(_HH_ASSISTANT) :].strip()
    if not reply:
        raise ctx.fail("empty response", "the last Assistant turn is empty", path)
    return text[:cut], reply


def _hh_messages(text: str, path: str, ctx: ParseContext) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> messages (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ctx.fail(
            "text before the first turn",
            f'the transcript does not start with "\\n\\nHuman:" (it starts {parts[0][:40]!r})',
            path,
        )
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        if not content.strip():
            raise ctx.fail("empty message", f"a {role} turn in the conversation is empty", path)
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise ctx.fail(
            "empty prompt", "the transcript has no Human turn before the last Assistant turn", path
        )
    return messages


def _parse_sharegpt(raw: dict[str, Any], ctx: ParseContext) -> Iterator[PreferenceRecord]:
    conversations = _get(raw, "conversations", ctx)
    messages = _messages(conversations, "conversations", ctx)
    prompt = _check_prompt_messages(messages, "conversations", ctx, role_key=_role_key(conversations))
    chosen_context, chosen = _reply(_get(raw, "chosen", ctx), "chosen", ctx)
    rejected_context, rejected = _reply(_get(raw, "rejected", ctx), "rejected", ctx)
    if chosen_context or rejected_context:
        raise ctx.fail(
            "wrong type",
            "chosen and rejected must each be one {from: gpt, value} reply",
            "chosen" if chosen_context else "rejected",
        )
    _distinct([chosen, rejected], ["chosen", "rejected"], ctx)
    yield PreferenceRecord(prompt, [chosen, rejected], None, None, ctx.record, ctx.file)


def _parse_ranking(raw: dict[str, Any], ctx: ParseContext) -> Iterator[PreferenceRecord]:
    prompt = _prompt(_get(raw, "prompt", ctx), "prompt", ctx)
    values = _maybe_json(_get(raw, "responses", ctx), ctx)
    if not isinstance(values, list):
        raise ctx.fail("wrong type", f"expected a list of responses, got {_type_name(values)}", "responses")
    responses = []
    for index, value in enumerate(values):
        context, text = _reply(value, f"responses[{index}]", ctx)
        if context:
            raise ctx.fail(
                "wrong type", "a response must be one reply, not a conversation", f"responses[{index}]"
            )
        responses.append(text)
    if len(responses) < 2:
        raise ctx.fail(
            "single response", f"a ranking needs two or more responses, got {len(responses)}", "responses"
        )
    scores = None
    unfinished = _unfinished_flags(raw, len(responses), ctx)
    raw_scores = _maybe_json(raw.get("scores"), ctx)
    if raw_scores is not None and not (ctx.csv and raw_scores == ""):
        if not isinstance(raw_scores, list):
            raise ctx.fail(
                "wrong type", f"expected a list of numbers, got {_type_name(raw_scores)}", "scores"
            )
        if len(raw_scores) != len(responses):
            raise ctx.fail(
                "scores do not match responses",
                f"{len(raw_scores)} scores for {len(responses)} responses",
                "scores",
            )
        scores = [_number(value, f"scores[{index}]", ctx) for index, value in enumerate(raw_scores)]
        order = sorted(range(len(responses)), key=lambda i: -scores[i])
        for a, b in zip(order, order[1:]):
            if scores[a] == scores[b]:
                raise ctx.fail(
                    "tied scores",
                    f"responses {a + 1} and {b + 1} have the same score ({scores[a]}), "
                    "so their order is undefined",
                    f"scores[{b}]",
                )
        responses = [responses[i] for i in order]
        scores = [scores[i] for i in order]
        unfinished = None if unfinished is None else [unfinished[i] for i in order]
    _distinct(responses, [f"responses[{i}]" for i in range(len(responses))], ctx)
    yield PreferenceRecord(prompt, responses, scores, None, ctx.record, ctx.file, unfinished)


def _unfinished_flags(raw: dict[str, Any], n: int, ctx: ParseContext) -> list[bool] | None:
    """The optional ``unfinished`` field of a ranking: one bool per response, in the file's order."""
    value = _maybe_json(raw.get("unfinished"), ctx)
    if value is None or (ctx.csv and value == ""):
        return None
    if not isinstance(value, list):
        raise ctx.fail("wrong type", f"expected a list of true/false, got {_type_name(value)}", "unfinished")
    if len(value) != n:
        raise ctx.fail("flags do not match responses", f"{len(value)} unfinished flags for {n} responses",
                       "unfinished")
    for index, flag in enumerate(value):
        if not isinstance(flag, bool):
            raise ctx.fail("wrong type", f"expected true or false, got {flag!r}", f"unfinished[{index}]")
    return list(value)


def _parse_oasst(raw: dict[str, Any], ctx: ParseContext) -> Iterator[PreferenceRecord]:
    root = _get(raw, "prompt", ctx)
    if not isinstance(root, dict):
        raise ctx.fail("wrong type", f"expected a message tree (an object), got {_type_name(root)}", "prompt")
    found: list[PreferenceRecord] = []
    _walk_tree(root, "prompt", [], ctx, found)
    yield from found


def _walk_tree(
    node: dict[str, Any],
    path: str,
    conversation: list[dict[str, str]],
    ctx: ParseContext,
    out: list[PreferenceRecord],
) -> None:
    role = node.get("role")
    if role not in ("prompter", "assistant"):
        raise ctx.fail("bad role", f"expected role 'prompter' or 'assistant', got {role!r}", f"{path}.role")
    text = _text(node.get("text"), f"{path}.text", ctx, what="message")
    conversation = [*conversation, {"role": "user" if role == "prompter" else "assistant", "content": text}]
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise ctx.fail(
            "wrong type", f"expected a list of replies, got {_type_name(replies)}", f"{path}.replies"
        )
    kept: list[tuple[int, dict[str, Any]]] = []
    for index, reply in enumerate(replies):
        reply_path = f"{path}.replies[{index}]"
        if not isinstance(reply, dict):
            raise ctx.fail("wrong type", f"a reply must be an object, got {_type_name(reply)}", reply_path)
        if reply.get("deleted") is True or reply.get("review_result") is False:
            ctx.report.skip("oasst: deleted or failed review (with its subtree)", ctx.record)
            continue
        expected = "assistant" if role == "prompter" else "prompter"
        if reply.get("role") != expected:
            raise ctx.fail(
                "bad role",
                f"a reply to a {role} message must be {expected!r}, got {reply.get('role')!r}",
                f"{reply_path}.role",
            )
        kept.append((index, reply))
    if role == "prompter" and kept:
        _rank_replies(kept, path, conversation, ctx, out)
    for index, reply in kept:
        _walk_tree(reply, f"{path}.replies[{index}]", conversation, ctx, out)


def _rank_replies(
    replies: list[tuple[int, dict[str, Any]]],
    path: str,
    conversation: list[dict[str, str]],
    ctx: ParseContext,
    out: list[PreferenceRecord],
) -> None:
    ranked: list[tuple[int, int, str]] = []  # (rank, index, text)
    unranked: list[int] = []
    for index, reply in replies:
        rank = reply.get("rank")
        if rank is None:
            unranked.append(index)
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ctx.fail(
                "wrong type", f"a rank must be a whole number >= 0, got {rank!r}", _rp(path, index)
            )
        ranked.append((rank, index, _text(reply.get("text"), f"{path}.replies[{index}].text", ctx)))
    if unranked and not ranked:
        ctx.report.skip("oasst: unranked reply (no ranked sibling)", ctx.record, len(unranked))
        return
    if unranked:
        error = ctx.fail(
            "oasst: unranked reply beside ranked siblings",
            f"{len(ranked)} of the {len(replies)} replies to this prompt are ranked but this one has "
            "no rank, so its place in the ranking is unknown",
            _rp(path, unranked[0]),
        )
        if not ctx.skip_invalid:
            raise error
        ctx.report.skip(error.reason, ctx.record, len(unranked))
    if len(ranked) < 2:
        ctx.report.skip("oasst: single ranked reply", ctx.record)
        return
    ranked.sort()
    for (rank_a, _, _), (rank_b, index_b, _) in zip(ranked, ranked[1:]):
        if rank_a == rank_b:
            raise ctx.fail("tied ranks", f"two replies share rank {rank_b}", _rp(path, index_b))
    responses = [text for _, _, text in ranked]
    _distinct(responses, [f"{path}.replies[{index}].text" for _, index, _ in ranked], ctx)
    prompt = _check_prompt_messages(conversation, path, ctx, indexed=False)
    out.append(PreferenceRecord(prompt, responses, None, None, ctx.record, ctx.file))


def _rp(path: str, index: int) -> str:
    return f"{path}.replies[{index}].rank"


def _parse_unpaired(raw: dict[str, Any], ctx: ParseContext) -> Iterator[FeedbackRecord]:
    label = _label(_get(raw, "label", ctx), ctx)
    if raw.get("completion") is None and raw.get("messages") is not None:
        context, completion = _reply(raw["messages"], "messages", ctx)
        if not context:
            raise ctx.fail("empty prompt", "the messages hold only the completion, no prompt", "messages")
        prompt: Prompt = _check_prompt_messages(context, "messages", ctx, role_key=_role_key(raw["messages"]))
    else:
        source_key = "prompt" if raw.get("prompt") is not None or "messages" not in raw else "messages"
        prompt = _prompt(_get(raw, source_key, ctx), source_key, ctx)
        context, completion = _reply(_get(raw, "completion", ctx), "completion", ctx)
        if context and context != (
            prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ):
            raise ctx.fail(
                "prompt mismatch", "the messages before the completion are not the prompt", "completion"
            )
    yield FeedbackRecord(prompt, completion, label, ctx.record, ctx.file)


def _label(value: Any, ctx: ParseContext) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return value.strip().lower() in ("true", "1")
    raise ctx.fail("wrong type", f"a label must be true or false, got {value!r}", "label")


PARSERS = {
    "explicit": _parse_explicit,
    "implicit": _parse_implicit,
    "sharegpt": _parse_sharegpt,
    "ranking": _parse_ranking,
    "oasst": _parse_oasst,
}
FEEDBACK_PARSERS = {"unpaired": _parse_unpaired}
