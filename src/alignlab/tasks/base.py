"""A task is a plug-in for the lab: prompts, a gold scorer (the simulated user), and SFT demonstrations.

The pipeline never looks inside a task: it asks for its prompts, renders them with the Alpaca template
(``instruction`` + the prompt as ``input``), samples, and asks the gold scorer. A new task is a function
returning a :class:`Task`, named in a lab config as ``module:function`` (or registered in ``tasks.loading.TASKS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
        reward: a *verifiable* reward a trainer may optimise directly (``f(prompts, responses) -> scores``,
            e.g. exact-answer checks), or None when the reward must be learned from preferences.
        reports: extra scorers (name -> ``f(prompts, responses) -> scores``) the evaluation reports beside the gold,
            e.g. ``{"vader": ...}``: the tone alone, for comparison with published numbers.
        gold_formula: the gold score in one line, for the report; it also keys the lab's cached stages, so data
            ranked by an older gold is recomputed.
    """

    name: str
    instruction: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold_score: GoldScorer
    demonstrations: list[dict[str, str]] = field(default_factory=list)
    description: str = ""
    reward: GoldScorer | None = None
    reports: dict[str, GoldScorer] = field(default_factory=dict)
    gold_formula: str = ""

    def as_prompt(self, text: str) -> dict[str, str]:
        """The prompt a trainer sees: an Alpaca mapping (rendered by ``encode_prompt(template="alpaca")``)."""
        return {"instruction": self.instruction, "input": text}
