"""Built-in programmatic rewards: plain functions ``f(prompts, responses) -> list[float]``, one score per
(prompt, response) pair, higher is better. Name one on the command line as ``--reward alignlab.reward_functions:NAME``
(any ``module:function`` or ``path/to/file.py:function`` of your own works the same way; see
:func:`alignlab.scoring.load_scorer`).

- :func:`sentiment`: the VADER sentiment of the response, in [-1, 1] (``vaderSentiment``, a lexicon and rules;
  no model). A programmatic scorer that drives PPO directly, as the DPO paper's "PPO-GT" used a sentiment
  classifier as the reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["sentiment"]


def sentiment(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """VADER's compound sentiment score of each response: -1 (very negative) .. +1 (very positive), 0 for text
    with no sentiment words (an empty response scores 0). The prompts are ignored.

    Example: ``alignlab ppo --policy smollm2-135m-instruct --reward alignlab.reward_functions:sentiment
    --prompts p.txt``.
    """
    from alignlab.tasks.sentiment import vader_compound

    return vader_compound(prompts, responses)
