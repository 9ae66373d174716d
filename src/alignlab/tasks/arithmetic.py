"""A verifiable task: short multi-step integer word problems with exact answers, generated here (no download).

Each problem is a start amount and two changes, e.g. "Mia has 3 apples. She buys 4 more, then gives away 2.
How many apples does Mia have now?" (3 + 4 - 2 = 5). The numbers are small (1-9, every intermediate result
between 0 and 27) because a 135M model gets a few percent of two-number sums right out of the box: with easy
problems, a group of 8 samples often holds a correct answer, which is what group-relative RL learns from.

- **gold** (the simulated user, :func:`correct`): 1.0 when the *last* integer in the response equals the answer,
  else 0.0; the mean is the accuracy (the lab reports it with its 95% interval);
- **reward** (what a trainer may optimise directly, :func:`arithmetic_reward`): the gold plus ``FORMAT_BONUS``
  when the response ends with "The answer is N." (a format reward: the answer is then unambiguous);
- **demonstrations**: worked answers in that format ("3 + 4 = 7. 7 - 2 = 5. The answer is 5."), so a short SFT
  stage teaches the format before RL.

The answer is recomputed from the problem's own words (:func:`answer_of`), so the reward needs nothing but the
prompt text, however it was rendered (Alpaca, chat, or a mapping). Problems are enumerated, shuffled by ``seed``,
and split into disjoint held-out and training sets.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Any

from alignlab.tasks.base import Task

INSTRUCTION = "Solve the math problem step by step. End with: The answer is N."
FORMAT_BONUS = 0.1

NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Sam", "He"), ("Lea", "She"), ("Ben", "He")]
ITEMS = ["apples", "books", "coins", "stickers", "pencils", "marbles"]
INCREASE = ["buys {n} more", "finds {n} more", "gets {n} more"]
DECREASE = ["gives away {n}", "eats {n}", "loses {n}"]
STEP = re.compile(r"\b(buys|finds|gets|gives away|eats|loses) (\d+)")
START = re.compile(r"\bhas (\d+) ")
NUMBER = re.compile(r"-?\d+")
FORMAT = re.compile(r"The answer is (-?\d+)\.?\s*$")


def problem(name: str, pronoun: str, item: str, a: int, steps: Sequence[tuple[str, int]]) -> str:
    """The text of a problem: ``a`` items, then each ``(verb phrase, n)`` step."""
    changes = ", then ".join(phrase.format(n=n) for phrase, n in steps)
    return f"{name} has {a} {item}. {pronoun} {changes}. How many {item} does {name} have now?"


def answer_of(text: str) -> int | None:
    """The exact answer of the last problem in ``text`` (any rendering of it), or None when there is none."""
    starts = list(START.finditer(text))
    if not starts:
        return None
    last = starts[-1]
    value = int(last.group(1))
    for verb, n in STEP.findall(text[last.end() :]):
        value += int(n) if verb in ("buys", "finds", "gets") else -int(n)
    return value


def solution(a: int, steps: Sequence[tuple[str, int]]) -> str:
    """A worked answer in the rewarded format: one equation per step, then "The answer is N."."""
    lines, value = [], a
    for phrase, n in steps:
        sign = "+" if phrase in INCREASE else "-"
        new = value + n if sign == "+" else value - n
        lines.append(f"{value} {sign} {n} = {new}.")
        value = new
    return " ".join(lines) + f" The answer is {value}."


def all_problems() -> list[tuple[str, str]]:
    """Every problem this task can pose, with its worked solution, in a fixed order (the same on every
    machine): start 1-9, two steps of 1-9, no intermediate result below 0."""
    out = []
    rng = random.Random(1234)  # names, items and verbs: varied but fixed
    for a in range(1, 10):
        for b in range(1, 10):
            for c in range(1, 10):
                for up1, up2 in ((True, True), (True, False), (False, True)):
                    first = a + b if up1 else a - b
                    second = first + c if up2 else first - c
                    if first < 0 or second < 0:
                        continue
                    name, pronoun = rng.choice(NAMES)
                    steps = [(rng.choice(INCREASE if up1 else DECREASE), b), (rng.choice(INCREASE if up2 else DECREASE),
                                                                             c)]
                    out.append((problem(name, pronoun, rng.choice(ITEMS), a, steps), solution(a, steps)))
    return out


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, dict):
        return " ".join(str(v) for v in prompt.values())
    if isinstance(prompt, list):  # chat messages
        return " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def final_number(response: str) -> int | None:
    """The last integer in a response, or None."""
    found = NUMBER.findall(response.replace(",", ""))
    return int(found[-1]) if found else None


def correct(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """The gold: 1.0 where the response's last integer equals the problem's answer, else 0.0."""
    out = []
    for prompt, response in zip(prompts, responses):
        answer = answer_of(_prompt_text(prompt))
        out.append(float(answer is not None and final_number(response) == answer))
    return out


def formatted(responses: Sequence[str]) -> list[float]:
    """1.0 where the response ends with "The answer is N." (the format the demonstrations teach)."""
    return [float(FORMAT.search(r.strip()) is not None) for r in responses]


def arithmetic_reward(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """The training reward: :func:`correct` plus ``FORMAT_BONUS`` for the answer format."""
    return [c + FORMAT_BONUS * f for c, f in zip(correct(prompts, responses), formatted(responses))]


def accuracy_interval(hits: Sequence[float]) -> tuple[float, float]:
    """Accuracy and the half-width of its 95% normal interval (``1.96 * sqrt(p (1 - p) / n)``)."""
    n = len(hits)
    p = sum(hits) / n if n else 0.0
    return p, 1.96 * math.sqrt(p * (1 - p) / n) if n else 0.0


def arithmetic_task(n_eval: int = 64, seed: int = 0, prompts: Sequence[str] | None = None,
                    n_demonstrations: int = 128) -> Task:
    """The built-in arithmetic task (see the module docstring). ``prompts`` replaces the problems (their answers
    are still read from their words, so they must follow the same phrasing)."""
    pool = [(p, None) for p in prompts] if prompts is not None else all_problems()
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    held = order[:n_eval]
    train = order[n_eval:]
    demos = [{"instruction": INSTRUCTION, "input": pool[i][0], "output": pool[i][1]}
             for i in train[:n_demonstrations] if pool[i][1] is not None]
    return Task(
        name="arithmetic",
        instruction=INSTRUCTION,
        train_prompts=[pool[i][0] for i in train],
        eval_prompts=[pool[i][0] for i in held],
        gold_score=correct,
        demonstrations=demos,
        description="two-step integer word problems; gold: the final number is the exact answer (accuracy)",
        reward=arithmetic_reward,
        gold_formula="1 when the answer's final number is the exact result, else 0 (accuracy)",
    )
