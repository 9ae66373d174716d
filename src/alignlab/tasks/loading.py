"""Tasks by name and prompt lists for the stages that generate (PPO, rejection sampling, best-of-n, ``generate``).

A task is found by its name in ``TASKS`` or as ``module:function`` (:func:`load_task`).

Prompts come from a ``.txt`` file (one per non-empty line), the ``prompt`` field of JSON/JSONL records, or the prompts
of any instruction or preference file (Alpaca prompts become Alpaca-style instruction mappings, messages stay
messages), or a built-in task's prompt split: ``task:sentiment:train`` / ``task:arithmetic:eval`` (Alpaca
mappings of the task's instruction and each opening, as the lab shows them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignlab.data.formats import iter_instruction_records
from alignlab.data.io import read_records
from alignlab.data.preference import detect_format as detect_preference
from alignlab.data.preference import load_feedback, load_preferences, prompts_of
from alignlab.errors import AlignlabError
from alignlab.tasks.arithmetic import arithmetic_task
from alignlab.tasks.base import Task
from alignlab.tasks.sentiment import sentiment_task

TASKS = {"sentiment": sentiment_task, "arithmetic": arithmetic_task}


def load_prompts(source: str | Path, *, limit: int | None = None) -> list[Any]:
    """Prompts (strings or chat message lists) from ``source``; raises for an empty or unreadable file."""
    path = Path(source)
    if str(source).startswith("task:"):
        prompts: list[Any] = _task_prompts(str(source))
    elif path.suffix == ".txt":
        if not path.exists():
            raise AlignlabError("prompt file does not exist", file=str(source))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise AlignlabError(f"not valid UTF-8 at byte {e.start}", file=str(source)) from e
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        prompts = _prompts_from_records(str(source))
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise AlignlabError("no prompts in this file", file=str(source))
    return prompts


def _task_prompts(source: str) -> list[Any]:
    parts = source.split(":")
    if len(parts) not in (3, 4) or parts[2] not in ("train", "eval") or (len(parts) == 4 and not parts[3].isdigit()):
        raise AlignlabError("a task prompt source is task:NAME:train or task:NAME:eval, optionally with the "
                            "held-out size: task:NAME:train:N (default 64)", file=source)
    task = load_task(parts[1], n_eval=int(parts[3]) if len(parts) == 4 else 64)
    return [task.as_prompt(p) for p in (task.train_prompts if parts[2] == "train" else task.eval_prompts)]


def _prompts_from_records(source: str) -> list[Any]:
    first = next(iter(read_records(source)), None)
    if first is None:
        return []
    number, record = first
    if isinstance(record.get("prompt"), str) and set(record) <= {"prompt", "id", "label", "category"}:
        return [r["prompt"] for _, r in read_records(source) if str(r.get("prompt", "")).strip()]
    if detect_preference(record):
        loader = load_feedback if "label" in record else load_preferences
        records, report = loader(source, skip_invalid=True)
        if sum(report.skipped.values()):
            import sys

            print(f"{source}: {report.summary()}", file=sys.stderr)
        return prompts_of(records)
    prompts: list[Any] = []
    for rec in iter_instruction_records(source):
        if rec.kind == "alpaca":
            prompts.append(rec.instruction + (f"\n\n{rec.input}" if rec.input else ""))
        elif rec.messages is not None:
            last_user = max(i for i, m in enumerate(rec.messages) if m["role"] == "user")
            prompts.append(rec.messages[: last_user + 1])
        elif rec.prompt is not None:
            prompts.append(rec.prompt)
        else:
            raise AlignlabError(
                "plain text records have no prompts", file=source, record=rec.record, field="text"
            )
    return prompts


def load_task(spec: str, *, prompts_file: str | None = None, n_eval: int = 64, seed: int = 0) -> Task:
    """A task by name (``sentiment``) or ``module:function``; ``prompts_file`` replaces its prompts.

    Raises before any training when the prompt set is empty, malformed, or too small for the held-out split.
    """
    if spec in TASKS:
        factory = TASKS[spec]
    elif ":" in spec:
        import importlib

        module, name = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise AlignlabError(f"cannot load task '{spec}': {e}", field="task") from e
    else:
        raise AlignlabError(f"unknown task '{spec}' (built-in: {', '.join(TASKS)}; or module:function)",
                            field="task")
    prompts = None
    if prompts_file:
        prompts = load_prompts(prompts_file)
        bad = [i for i, p in enumerate(prompts, 1) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise AlignlabError("task prompts must be non-empty strings", file=prompts_file, record=bad[0])
        if len(prompts) < n_eval + 8:
            raise AlignlabError(
                f"{len(prompts)} prompts are too few: the held-out split takes {n_eval} and training needs "
                f"at least 8 more", file=prompts_file)
    task = factory(n_eval=n_eval, seed=seed, prompts=prompts)
    if not task.train_prompts or not task.eval_prompts:
        raise AlignlabError(f"task '{task.name}' has no train or no held-out prompts", field="task")
    return task
