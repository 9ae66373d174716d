"""The sentiment task's gold (tone with substance) and the clustered, paired evaluation statistics."""

import math
import random

import numpy as np
import pytest

from alignlab.data.templates import alpaca_input, render_alpaca_prompt
from alignlab.evaluate import (
    clustered_mean_ci95,
    compare_to_baseline,
    evaluate_samples,
    mean_ci95,
    paired_bootstrap,
    prompt_win_shares,
    spearman,
)
from alignlab.generation import Sample
from alignlab.tasks import load_task
from alignlab.tasks.sentiment import (
    RELEVANCE_WEIGHT,
    REPETITION_WEIGHT,
    relevance,
    repetition,
    substantive_gold,
    vader_compound,
)

PROMPT = "I saw the new thriller."
SALAD = ("The cast is talented and beautiful it has great acting and beautiful music. The cast has great beautiful "
         "people with great families. It has beautiful beautiful characters with lots of")


def test_the_task_scores_with_the_substantive_gold_and_reports_vader():
    task = load_task("sentiment", n_eval=50)
    assert task.gold_score is substantive_gold
    assert task.reports == {"vader": vader_compound}
    assert str(REPETITION_WEIGHT) in task.gold_formula and "\n" not in task.gold_formula


def test_fluent_answer_beats_repeated_word_salad_of_the_same_tone():
    fluent = "The acting is wonderful and the ending is beautiful, a great film."
    salad = "Beautiful beautiful beautiful film, great great great film."
    tone_fluent, tone_salad = vader_compound([PROMPT] * 2, [fluent, salad])
    assert abs(tone_fluent - tone_salad) < 0.1  # the same sentiment for VADER
    gold_fluent, gold_salad = substantive_gold([PROMPT] * 2, [fluent, salad])
    assert gold_fluent == pytest.approx(tone_fluent)  # nothing repeated, on topic: VADER itself
    assert gold_salad < gold_fluent - 0.5
    # the reward-hacked answer: VADER ~0.99, the gold far below
    assert vader_compound([PROMPT], [SALAD])[0] > 0.95 and substantive_gold([PROMPT], [SALAD])[0] < 0.5


def test_an_answer_that_ignores_its_prompt_scores_below_one_that_continues_it():
    on_topic = "The acting was wonderful and the director was friendly."
    off_topic = "The food was wonderful and the waiter was friendly."
    assert vader_compound([PROMPT] * 2, [on_topic, off_topic])[0] == vader_compound([PROMPT], [off_topic])[0]
    gold_on, gold_off = substantive_gold([PROMPT] * 2, [on_topic, off_topic])
    assert gold_off == pytest.approx(gold_on - RELEVANCE_WEIGHT)
    # the prompt's own words count as on topic (the rendered Alpaca prompt: only its input is read)
    rendered = render_alpaca_prompt("Continue the review.", "The waiter saw it.")
    assert relevance(rendered, off_topic) == 1.0 and relevance(PROMPT, off_topic) == 0.0
    # the input, as the report shows it too; a prompt without an input section is read whole
    assert alpaca_input(rendered) == "The waiter saw it." and alpaca_input(PROMPT) == PROMPT


def test_gold_formula_on_a_hand_computed_example():
    answer = "The dog ran to the park. The dog sat."
    # content words: dog ran park dog sat -> one repeat in 5 -> rep = 0.2; none about a film -> rel = 0;
    # VADER finds no sentiment -> s = 0; gold = 0 - 1.5 * 0.2 - 0.3 * (1 - 0) = -0.6
    assert vader_compound([PROMPT], [answer]) == [0.0]
    assert repetition(answer) == pytest.approx(0.2) and relevance(PROMPT, answer) == 0.0
    assert substantive_gold([PROMPT], [answer]) == [pytest.approx(-0.6)]
    assert substantive_gold([PROMPT], ["Bad " * 30])[0] == -1.0  # clipped at -1


def test_clustered_interval_against_hand_computation():
    # 3 prompts x 2 answers, prompts interleaved: prompt 0 -> 1, 1.5; prompt 1 -> 2, 3; prompt 2 -> 6, 5.5
    values = [1.0, 6.0, 2.0, 1.5, 5.5, 3.0]
    prompts = [0, 2, 1, 0, 2, 1]
    # prompt means 1.25, 2.5, 5.75: mean 19/6; sd^2 = sum of squared deviations / (3 - 1)
    means = [1.25, 2.5, 5.75]
    mean = sum(means) / 3
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / 2)
    got_mean, got_half = clustered_mean_ci95(values, prompts)
    assert got_mean == pytest.approx(19 / 6) and got_half == pytest.approx(1.96 * sd / math.sqrt(3))
    assert got_half == pytest.approx(2.6287, abs=1e-4)
    # answers to one prompt agree here: treating the 6 as independent claims a far narrower interval
    assert got_half > 1.5 * mean_ci95(values)[1]
    # one answer per prompt: the plain interval
    assert clustered_mean_ci95([1.0, 2.0, 3.0], [0, 1, 2]) == pytest.approx(mean_ci95([1.0, 2.0, 3.0]))


def test_bootstrap_is_seeded_and_agrees_with_the_clustered_interval_on_a_large_sample():
    rng = random.Random(0)
    values, prompts = [], []
    for p in range(400):  # a prompt effect shared by its 4 answers, plus answer noise
        effect = rng.gauss(0, 1)
        for _ in range(4):
            values.append(effect + rng.gauss(0, 0.5))
            prompts.append(p)
    means = np.array([np.mean(values[4 * p : 4 * p + 4]) for p in range(400)])
    interval = paired_bootstrap(np.mean, means, seed=3)
    assert interval == paired_bootstrap(np.mean, means, seed=3)
    assert interval != paired_bootstrap(np.mean, means, seed=4)
    mean, half = clustered_mean_ci95(values, prompts)
    lo, hi = interval
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.1 * half)


def test_win_rate_and_gap_closed_on_a_small_hand_made_case():
    method, base = [1.0, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0]
    index = [0, 0, 1, 1]
    # prompt 0: (1 v 0) win, (1 v .5) win, (.5 v 0) win, (.5 v .5) tie -> 3.5 / 4
    # prompt 1: (.5 v .5) tie, (.5 v 1) loss, twice -> 1 / 4
    shares = prompt_win_shares({0: [1.0, 0.5], 1: [0.5, 0.5]}, {0: [0.0, 0.5], 1: [0.5, 1.0]})
    assert shares == {0: 0.875, 1: 0.25}
    out = compare_to_baseline(method, index, base, index)
    assert out["win_rate"] == pytest.approx((0.875 + 0.25) / 2)
    # gold: (0.75 + 0.5) / 2 = 0.625 against SFT's (0.25 + 0.75) / 2 = 0.5 -> (0.625 - 0.5) / (1 - 0.5) = 0.25
    assert out["gap_closed"] == pytest.approx(0.25)
    assert out["win_rate_lo"] <= out["win_rate"] <= out["win_rate_hi"]
    assert out["gap_closed_lo"] <= out["gap_closed"] <= out["gap_closed_hi"]


def test_spearman_against_hand_computation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3), centred: (-1.5, 0, 0, 1.5) and (-1.5, -.5, .5, 1.5);
    # products sum to 4.5, squares to 4.5 and 5 -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_evaluate_samples_reports_per_answer_scores_clustered_by_prompt():
    texts = ["A wonderful film.", "A great film.", "An awful film.", "A boring film."]
    samples = [Sample(prompt_ids=[1], response_ids=[2, 3], text=t, finished=True) for t in texts]
    prompts = [PROMPT, PROMPT, "I wanted to like the musical.", "I wanted to like the musical."]
    result = evaluate_samples(samples, prompts, gold_score=substantive_gold, prompt_index=[0, 0, 1, 1],
                              reports={"vader": vader_compound}, baseline_gold=[0.0] * 4,
                              baseline_index=[0, 0, 1, 1])
    assert result["prompts"] == 2 and result["prompt_index"] == [0, 0, 1, 1]
    assert result["vader_scores"] == vader_compound(prompts, texts)
    assert (result["vader"], result["vader_ci95"]) == clustered_mean_ci95(result["vader_scores"], [0, 0, 1, 1])
    assert result["gold_scores"] == substantive_gold(prompts, texts)
    assert result["win_rate"] == pytest.approx(0.5)  # prompt 0 wins both pairs, prompt 1 loses both
