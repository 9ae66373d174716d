"""Controlled sentiment generation: the experiment the DPO paper used to compare DPO with PPO.

The model writes the rest of a movie review from its opening; the preference to learn is positive
sentiment. The gold "user" is the VADER sentiment analyser (``vaderSentiment``, compound score in [-1, 1]),
which nobody here wrote: the learners only ever see it through preference labels, and it judges the result.

Prompts: review openings written for this project, combining positive, neutral and negative opening
phrases with kinds of film (3 x 8 x 15 = 360 openings, the same on every machine), split into train and
held-out prompts by a fixed seed. ``--prompts FILE`` replaces them (e.g. prefixes of IMDb reviews).

SFT demonstrations: also written for this project. Each continues a training opening (a complete sentence)
with two or three
sentences drawn at random (fixed seed) from lists of positive, neutral and negative review sentences, so the
SFT model learns the format (a short review continuation that ends) without being pushed to either
sentiment: its mean gold score starts near zero and there is room to align it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

from alignlab.tasks.base import Task

INSTRUCTION = "Continue the movie review."

FILMS = [
    "this movie", "the new thriller", "this old western", "the sequel", "this animated film",
    "the documentary", "this romantic comedy", "the horror film", "this family drama", "the war epic",
    "this indie film", "the musical", "the remake", "this science fiction film", "the detective story",
]

OPENINGS = {
    "positive": [
        "I absolutely loved {film}.",
        "{Film} is one of the best things I have seen this year.",
        "I was pleasantly surprised by {film}.",
        "My whole family enjoyed {film}.",
        "I have already watched {film} twice.",
        "{Film} made me laugh and cry at the same time.",
        "Everyone should see {film}.",
        "I went in with high hopes for {film}.",
    ],
    "neutral": [
        "Last night I finally watched {film}.",
        "I saw {film} at the cinema yesterday.",
        "My friend picked {film} for movie night.",
        "I did not know what to expect from {film}.",
        "{Film} runs for about two hours.",
        "I watched {film} on a long flight.",
        "{Film} is based on a book I have not read.",
        "We rented {film} over the weekend.",
    ],
    "negative": [
        "I regret paying to see {film}.",
        "{Film} was a disappointment from the start.",
        "I almost walked out of {film}.",
        "The trailer for {film} promised a lot.",
        "I wanted to like {film}.",
        "{Film} is far too long.",
        "I fell asleep halfway through {film}.",
        "Nobody in my family liked {film}.",
    ],
}

SENTENCES = {
    "positive": [
        "the acting is wonderful and every scene feels alive.",
        "the story is clever, warm and full of surprises.",
        "the music is beautiful and the ending is perfect.",
        "I left the theater smiling and would happily watch it again.",
        "the cast has great chemistry and the jokes land every time.",
    ],
    "neutral": [
        "the film follows a small town over one summer.",
        "most of the story takes place in a single house.",
        "the director also wrote the script.",
        "it was shown in a small theater near my home.",
        "the main character is a teacher who moves to a new city.",
    ],
    "negative": [
        "the plot is dull and the dialogue is painfully bad.",
        "the acting is wooden and the ending makes no sense.",
        "it is boring, slow and far too predictable.",
        "the jokes fall flat and the characters are annoying.",
        "I was bored for most of it and would not recommend it.",
    ],
}


@lru_cache(maxsize=1)
def _vader():  # loading the lexicon is slow: once per process
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The gold score: VADER's compound sentiment of each response, in [-1, 1]."""
    analyser = _vader()
    return [float(analyser.polarity_scores(r)["compound"]) for r in responses]


def all_openings() -> list[tuple[str, str]]:
    """(opening, its sentiment class) for every built-in opening, in a fixed order."""
    out = []
    for label, templates in OPENINGS.items():
        for template in templates:
            for film in FILMS:
                out.append((template.format(film=film, Film=film[0].upper() + film[1:]), label))
    return out


def demonstration(opening: str, rng: random.Random) -> str:
    """A short continuation of ``opening`` made of 2-3 sentences of random sentiment."""
    parts = []
    for _ in range(rng.choice([2, 3])):
        label = rng.choice(list(SENTENCES))
        parts.append(rng.choice(SENTENCES[label]))
    return " ".join(p[0].upper() + p[1:] for p in parts)


def sentiment_task(n_eval: int = 64, seed: int = 0, prompts: Sequence[str] | None = None,
                   n_demonstrations: int = 128) -> Task:
    """The built-in controlled-sentiment task (see the module docstring)."""
    openings = list(prompts) if prompts is not None else [o for o, _ in all_openings()]
    rng = random.Random(seed)
    order = list(range(len(openings)))
    rng.shuffle(order)
    held = sorted(order[:n_eval])
    held_set = set(held)
    train = [openings[i] for i in order if i not in held_set]  # shuffled: any first-N slice mixes sentiments
    evals = [openings[i] for i in held]
    demo_rng = random.Random(seed + 1)
    demos = [
        {"instruction": INSTRUCTION, "input": p, "output": demonstration(p, demo_rng)}
        for p in demo_rng.sample(train, min(n_demonstrations, len(train)))
    ]
    return Task(
        name="sentiment",
        instruction=INSTRUCTION,
        train_prompts=train,
        eval_prompts=evals,
        gold_score=vader_compound,
        demonstrations=demos,
        description="continue a movie review; preferred: positive sentiment (VADER compound, gold)",
    )
