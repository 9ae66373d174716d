"""Bad input, tried systematically: every loader, every kind of broken file. Each case either raises an
AlignlabError naming the file (and, where there is one, the record and the field) or, with the skip option,
counts what it skipped. No other exception type may escape, and nothing is dropped silently."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from alignlab.data.formats import load_sft_dataset
from alignlab.data.preference import load_feedback, load_preferences
from alignlab.errors import AlignlabError
from alignlab.tasks.loading import load_prompts

GOOD = {
    "sft": {"instruction": "Say hi.", "input": "", "output": "Hi."},
    "pref": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    "feedback": {"prompt": "Say hi.", "completion": "Hi!", "label": True},
}


def _cases(kind: str) -> dict[str, bytes]:
    good = GOOD[kind]
    line = json.dumps(good).encode()
    rng = random.Random(kind)
    first_key = next(iter(good))
    wrong_type = dict(good)
    wrong_type[list(good)[-1]] = {"nested": [1, 2]}
    missing = {k: v for k, v in good.items() if k != list(good)[-1]}
    empty = {k: ("" if isinstance(v, str) else v) for k, v in good.items()}
    huge = dict(good)
    huge[first_key] = 10**400 if kind != "sft" else 1e308
    return {
        "random bytes": bytes(rng.getrandbits(8) for _ in range(300)),
        "truncated JSON": line + b"\n" + line[: len(line) // 2] + b"\n",
        "wrong types": line + b"\n" + json.dumps(wrong_type).encode() + b"\n",
        "missing fields": line + b"\n" + json.dumps(missing).encode() + b"\n",
        "empty strings": line + b"\n" + json.dumps(empty).encode() + b"\n",
        "very long line": line + b"\n" + json.dumps({**good, "junk": "x" * 2_000_000}).encode() + b"\n",
        "invalid UTF-8": line + b"\n" + line.replace(b"Say", b"S\xff\xfey") + b"\n",
        "huge numbers": line + b"\n" + json.dumps(huge).encode() + b"\n",
        "not an object": line + b"\n[1, 2, 3]\n",
        "empty file": b"",
        "only whitespace": b"\n\n  \n",
    }


LOADERS: dict[str, tuple[str, Callable[..., object]]] = {
    "load_sft_dataset": ("sft", lambda path, tok, skip: load_sft_dataset(path, tok, skip_invalid=skip)),
    "load_preferences": ("pref", lambda path, tok, skip: load_preferences(path, skip_invalid=skip)),
    "load_feedback": ("feedback", lambda path, tok, skip: load_feedback(path, skip_invalid=skip)),
    "load_prompts": ("pref", lambda path, tok, skip: load_prompts(path)),
}


def _skipped(result: object) -> int:
    report = result[1] if isinstance(result, tuple) else None
    if report is None:
        return 0
    counters = [getattr(report, name, None) for name in ("skipped", "skipped_invalid", "dropped")]
    return sum(sum(c.values()) for c in counters if c)


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("case", list(_cases("sft")))
def test_every_bad_file_is_a_clear_error_or_a_counted_skip(tmp_path, tiny_tokenizer, loader, case):
    kind, load = LOADERS[loader]
    path = tmp_path / f"bad_{case.replace(' ', '_')}.jsonl"
    path.write_bytes(_cases(kind)[case])
    try:
        strict = load(path, tiny_tokenizer, False)
    except AlignlabError as e:
        message = str(e)
        assert path.name in message, message
        if case in ("truncated JSON", "invalid UTF-8", "not an object"):
            assert "record 2" in message or "line 2" in message, message
        if case in ("wrong types", "missing fields") and loader != "load_prompts":
            assert "field" in message, message
        strict = None
    if strict is not None:
        # accepted without error: then nothing was lost (every record is accounted for)
        records = [r for r in _cases(kind)[case].split(b"\n") if r.strip()]
        if isinstance(strict, tuple):
            assert len(strict[0]) + _skipped(strict) == len(records), f"{loader} lost records on {case}"
        return
    if loader == "load_prompts" or case in ("random bytes", "empty file", "only whitespace", "truncated JSON",
                                            "invalid UTF-8"):
        return  # file-level damage: skipping records cannot help, the error is the answer
    try:
        result = load(path, tiny_tokenizer, True)
    except AlignlabError as e:  # nothing valid left is also a clear error
        assert path.name in str(e)
        return
    assert _skipped(result) >= 1, f"{loader} on {case}: the bad record vanished without being counted"


def test_unsafe_yaml_is_refused(tmp_path):
    from alignlab.config import SFTConfig, build_config

    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(AlignlabError, match="invalid YAML"):
        build_config(SFTConfig, yaml_file=str(evil))


def test_path_in_message_for_missing_files(tmp_path, tiny_tokenizer):
    missing = tmp_path / "nowhere.jsonl"
    for _, (_, load) in LOADERS.items():
        with pytest.raises(AlignlabError, match="nowhere.jsonl"):
            load(missing, tiny_tokenizer, False)


def test_files_read_here_are_never_written(tmp_path, tiny_tokenizer):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD["sft"]) + "\n")
    before = path.read_bytes()
    load_sft_dataset(path, tiny_tokenizer)
    assert path.read_bytes() == before
    assert isinstance(Path(path), Path)
