"""Controlled sentiment generation: the experiment the DPO paper used to compare DPO with PPO.

The model writes the rest of a movie review from its opening; the preference to learn is positive
sentiment. The gold "user" starts from the VADER sentiment analyser (``vaderSentiment``, compound score in
[-1, 1]), which nobody here wrote, and asks for substance besides tone (:func:`substantive_gold`): VADER alone
gives 0.99 to positive word salad ("... beautiful beautiful characters with great ..."), which a reward-hacked
policy finds. The learners only ever see the gold through preference labels, and it judges the result; VADER
alone stays a reported column (``Task.reports``), the DPO paper's measure.

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
import re
from collections.abc import Sequence
from functools import lru_cache

from alignlab.data.templates import alpaca_input
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
    """VADER's compound sentiment of each response, in [-1, 1] (tone only; reported beside the gold)."""
    analyser = _vader()
    return [float(analyser.polarity_scores(r)["compound"]) for r in responses]


# -- the gold: tone, without repetition, about the film --------------------------------------------------------

REPETITION_WEIGHT = 1.5  # w_rep: all content words repeats (rep = 1) cost 1.5, more than VADER's whole upper half
RELEVANCE_WEIGHT = 0.3  # w_rel: an answer with nothing about the film loses 0.3, a clear but not dominant drop
RELEVANCE_WORDS = 1  # on-topic content words an answer needs for full relevance (answers are ~30 tokens)

GOLD_FORMULA = (f"clip(VADER - {REPETITION_WEIGHT:g} x repeated content-word share - {RELEVANCE_WEIGHT:g} x "
                f"(1 - relevance), -1, 1); relevance = min(1, distinct on-topic content words / {RELEVANCE_WORDS})")

# function words: what is left ("content words") carries the answer's substance
STOPWORDS = frozenset("""
a about after again all also am an and any are as at be because been before being but by can could did do does
doing don down during each even ever every few for from further had has have having he her here hers him his how
if in into is it its itself just me more most much my no nor not now of off on once only or other our out over own
really same she should so some such than that the their them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your yet quite
""".split())

# what a movie review talks about: films, their parts and makers, and the kinds of film the openings name
MOVIE_WORDS = frozenset("""
film films movie movies cinema theater theatre screen story stories plot acting actor actors actress cast scene
scenes setting sets ending climax twist opening director directors direction directing script screenplay writing
dialogue narrative tale plot pacing performance performances role roles lead leads protagonist hero villain
character characters actresses music soundtrack score songs jokes humor visuals effects camera cinematography
trailer sequel original remake thriller western horror comedy documentary musical drama epic indie animated
animation romantic romance science fiction detective war family book viewer viewers audience watch watched
recommend
""".split())


def content_words(text: str) -> list[str]:
    """The lowercase alphabetic words of ``text`` that are not function words (``STOPWORDS``), nor shorter
    than 3 letters (the halves of contractions: "don", "t")."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOPWORDS]


def repetition(response: str) -> float:
    """rep = (content words that repeat an earlier content word of the response) / (content words), in [0, 1);
    0 without content words. "beautiful beautiful" and "great ... great ... great" count every repeat; a varied
    continuation scores near 0."""
    words = content_words(response)
    return (len(words) - len(set(words))) / len(words) if words else 0.0


def _opening(prompt: str) -> str:
    """The review opening inside a rendered Alpaca prompt (its ``input``), or the prompt itself: the template's
    preamble and instruction are the same for every prompt and say nothing about this film."""
    return alpaca_input(prompt)


def relevance(prompt: str | None, response: str) -> float:
    """rel = min(1, |on-topic content words of the response| / RELEVANCE_WORDS), in [0, 1]: distinct content words
    the response shares with the prompt's opening or with ``MOVIE_WORDS``. An answer about a restaurant scores 0."""
    topic = MOVIE_WORDS | set(content_words(_opening(prompt or "")))
    return min(1.0, len(set(content_words(response)) & topic) / RELEVANCE_WORDS)


def substantive_gold(prompts: Sequence[str] | None, responses: Sequence[str]) -> list[float]:
    """The sentiment task's gold: positive tone, with substance.

        gold = clip(s - w_rep * rep - w_rel * (1 - rel), -1, 1)

    s = VADER compound of the response in [-1, 1] (:func:`vader_compound`); rep = the share of its content words
    that repeat an earlier one (:func:`repetition`); rel = its relevance to the review it continues
    (:func:`relevance`); w_rep = ``REPETITION_WEIGHT``, w_rel = ``RELEVANCE_WEIGHT``. On the SFT model's samples the
    order is nearly VADER's (docs/lab.md gives the rank correlation; every lab report states it), while positive
    word salad drops from ~0.99 to below 0.5 and an answer that ignores its prompt loses ``RELEVANCE_WEIGHT``.
    Pure text functions: no model computes it. ``prompts`` may be None (relevance then from ``MOVIE_WORDS`` only).
    """
    tone = vader_compound(prompts or [], responses)
    prompts = prompts if prompts is not None else [None] * len(responses)
    return [max(-1.0, min(1.0, s - REPETITION_WEIGHT * repetition(r) - RELEVANCE_WEIGHT * (1 - relevance(p, r))))
            for s, p, r in zip(tone, prompts, responses)]


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
        gold_score=substantive_gold,
        demonstrations=demos,
        description="continue a movie review; preferred: positive sentiment with substance (VADER compound, less "
                    "repetition and off-topic penalties: the gold)",
        reports={"vader": vader_compound},
        gold_formula=GOLD_FORMULA,
    )
