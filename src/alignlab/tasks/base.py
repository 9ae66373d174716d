"""A task is a plug-in for the lab: prompts, a gold scorer (the simulated user), and SFT demonstrations.

The pipeline never looks inside a task: it asks for its prompts, renders them with the Alpaca template
(``instruction`` + the prompt as ``input``), samples, and asks the gold scorer. A new task is a function
returning a :class:`Task`, named in a lab config as ``module:function`` (or registered in ``TASKS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignlab.errors import AlignlabError

GoldScorer = Callable[[Sequence[Any], Sequence[str]], list[float]]


@dataclass
class Task:
    """Everything the lab needs to know about a task.

    Attributes:
        name: short name used in run folders and reports.
        instruction: the Alpaca instruction every prompt is shown with.
        train_prompts / eval_prompts: the prompt texts (the Alpaca ``input``), disjoint.
        gold_score: ``f(prompts, responses) -> scores``, higher is better; the simulated user.
        demonstrations: Alpaca records ``{instruction, input, output}`` for the SFT stage.
        description: one line for the report.
    """

    name: str
    instruction: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold_score: GoldScorer
    demonstrations: list[dict[str, str]] = field(default_factory=list)
    description: str = ""

    def as_prompt(self, text: str) -> dict[str, str]:
        """The prompt a trainer sees: an Alpaca mapping (rendered by ``encode_prompt(template="alpaca")``)."""
        return {"instruction": self.instruction, "input": text}


def load_task(spec: str, *, prompts_file: str | None = None, n_eval: int = 64, seed: int = 0) -> Task:
    """A task by name (``sentiment``) or ``module:function``; ``prompts_file`` replaces its prompts.

    Raises before any training when the prompt set is empty, malformed, or too small for the held-out split.
    """
    from alignlab.tasks import TASKS

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
        from alignlab.data.prompts import load_prompts

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
