"""The study (``alignlab lab study``): frontier math on hand-made points, the verdict's logic, bad input, and the
quick study end to end (report, resume after a failure, every stage reused on a rerun)."""

from __future__ import annotations

import json
import math

import pytest

from alignlab.cli import main
from alignlab.config import StudyConfig, build_config
from alignlab.lab.frontier import (
    AtBudget,
    envelope_at,
    mean_interval,
    paired_difference,
    t_quantile_975,
    upper_envelope,
)
from alignlab.lab.study_report import budget_sentence, dpo_paper_verdict

# ----------------------------------------------------------------------------------------------- frontier math


def test_upper_envelope_drops_dominated_points_and_starts_at_sft():
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.8), (0.5, 0.1), (4.0, 0.8), (-0.1, 0.05)]
    # (2, 0.4) is beaten by (1, 0.5); (4, 0.8) by (3, 0.8); (0.5, 0.1) and (-0.1 -> 0, 0.05) by SFT (0, 0.2)
    assert upper_envelope(points, sft_gold=0.2) == [(0.0, 0.2), (1.0, 0.5), (3.0, 0.8)]
    assert upper_envelope([], sft_gold=0.3) == [(0.0, 0.3)]
    assert upper_envelope([(0.0, 0.6)], sft_gold=0.3) == [(0.0, 0.6)]  # a better model at KL 0 replaces SFT


def test_envelope_at_interpolates_and_flags_beyond_the_end():
    envelope = [(0.0, 0.2), (1.0, 0.5), (3.0, 0.8)]
    # between (1, 0.5) and (3, 0.8): 0.5 + 0.3 * (2 - 1) / (3 - 1) = 0.65
    assert envelope_at(envelope, 2.0).gold == pytest.approx(0.65)
    assert envelope_at(envelope, 0.5) == (pytest.approx(0.35), True)
    assert envelope_at(envelope, 1.0) == (pytest.approx(0.5), True)
    assert envelope_at(envelope, 3.0) == (pytest.approx(0.8), True)
    assert envelope_at(envelope, 5.0) == AtBudget(0.8, reached=False)


def test_interval_across_seeds_and_paired_difference_by_hand():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    # 0.5, 0.6, 0.7: mean 0.6, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    interval = mean_interval([0.5, 0.6, 0.7])
    assert interval.mean == pytest.approx(0.6) and interval.half_width == pytest.approx(0.24843, abs=1e-4)
    assert math.isnan(mean_interval([0.4]).half_width)
    # differences 0.1, 0.2, 0.3: mean 0.2, the same half-width; the seeds' shared luck (+0.4 on seed 3) cancels
    diff = paired_difference([0.6, 0.8, 1.4], [0.5, 0.6, 1.1])
    assert diff.mean == pytest.approx(0.2) and diff.half_width == pytest.approx(0.24843, abs=1e-4)
    assert not diff.excludes_zero()
    assert paired_difference([0.7, 0.8, 0.9], [0.5, 0.61, 0.7]).excludes_zero()


# ----------------------------------------------------------------------------------------------- the verdict


def _at(*golds: float, reached: bool = True) -> list[AtBudget]:
    return [AtBudget(g, reached) for g in golds]


def test_budget_sentence_names_a_clear_winner_or_says_within_noise():
    clear = {"ppo": _at(0.50, 0.55, 0.60), "dpo": _at(0.70, 0.76, 0.80), "bon": _at(0.40, 0.45, 0.50)}
    sentence = budget_sentence(5.0, clear)
    assert sentence.startswith("At KL <= 5 nats DPO wins") and "runner-up PPO (KL)" in sentence
    noisy = {"ppo": _at(0.50, 0.70, 0.60), "dpo": _at(0.62, 0.58, 0.66)}
    sentence = budget_sentence(2.0, noisy)
    assert sentence.startswith("At KL <= 2 nats DPO leads") and "within noise of PPO (KL)" in sentence
    assert "includes 0" in sentence and "wins" not in sentence
    assert "no interval" in budget_sentence(2.0, {"ppo": _at(0.5), "dpo": _at(0.6)})  # one seed


def test_the_leader_wins_only_when_it_beats_every_method_that_reaches_the_budget():
    # DPO is clearly above the runner-up by mean (IPO: differences 0.2, 0.21, 0.2) but not above PPO, whose
    # mean is lower and whose seeds scatter (differences 0.25, -0.03, 0.25): DPO only leads, within noise of PPO
    at = {"ipo": _at(0.50, 0.55, 0.60), "dpo": _at(0.70, 0.76, 0.80), "ppo": _at(0.45, 0.79, 0.55)}
    sentence = budget_sentence(5.0, at)
    assert sentence.startswith("At KL <= 5 nats DPO leads") and "wins" not in sentence
    assert "within noise of PPO (KL)" in sentence and "IPO" not in sentence
    # a method that never reaches the budget is compared by its best at less KL, and named as such
    at["ppo"] = _at(0.45, 0.79, 0.55, reached=False)
    sentence = budget_sentence(5.0, at)
    assert sentence.startswith("At KL <= 5 nats DPO leads") and "within noise of PPO (KL)" in sentence
    assert "PPO (KL): frontier ends before this budget on every seed, compared by its best" in sentence
    at["ppo"] = _at(0.45, 0.50, 0.55, reached=False)
    assert budget_sentence(5.0, at).startswith("At KL <= 5 nats DPO wins")
    # the leader reaching the budget on only some seeds is said
    at["dpo"] = [AtBudget(0.70, True), AtBudget(0.76, False), AtBudget(0.80, True)]
    assert "DPO's frontier reached on 2/3 seeds" in budget_sentence(5.0, at)


def test_dpo_paper_statement_reproduced_not_or_inconclusive():
    reproduced = {2.0: {"dpo": _at(0.70, 0.76, 0.80), "ppo": _at(0.50, 0.55, 0.60)},
                  5.0: {"dpo": _at(0.80, 0.82, 0.90), "ppo": _at(0.85, 0.76, 0.86)}}  # >= at 5, within noise
    status, sentence = dpo_paper_verdict(reproduced)
    assert status == "reproduced" and "**reproduced**" in sentence
    not_reproduced = {2.0: {"dpo": _at(0.50, 0.55, 0.60), "ppo": _at(0.70, 0.76, 0.80)}}
    assert dpo_paper_verdict(not_reproduced)[0] == "not reproduced"
    noise = {2.0: {"dpo": _at(0.62, 0.58, 0.66), "ppo": _at(0.50, 0.70, 0.60)}}
    assert dpo_paper_verdict(noise)[0] == "inconclusive"
    # a budget PPO never reaches does not count: DPO's lead there is no evidence
    unreached = {2.0: {"dpo": _at(0.62, 0.58, 0.66), "ppo": _at(0.50, 0.70, 0.60)},
                 10.0: {"dpo": _at(0.90, 0.91, 0.92), "ppo": _at(0.50, 0.70, 0.60, reached=False)}}
    assert dpo_paper_verdict(unreached)[0] == "inconclusive"
    assert dpo_paper_verdict({2.0: {"dpo": _at(0.5)}})[0] == "not tested"


def test_dpo_paper_statement_is_mixed_when_each_leads_somewhere():
    # DPO significantly better at 2 nats; PPO's mean higher at 5 nats, within noise: neither "reproduced" nor noise
    mixed = {2.0: {"dpo": _at(0.70, 0.76, 0.80), "ppo": _at(0.50, 0.55, 0.60)},
             5.0: {"dpo": _at(0.80, 0.82, 0.86), "ppo": _at(0.85, 0.76, 0.90)}}
    status, sentence = dpo_paper_verdict(mixed)
    assert status == "mixed" and "**mixed**" in sentence
    assert "DPO is significantly better at 2 nats" in sentence
    assert "PPO's mean is higher (within noise) at 5 nats" in sentence


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_stage_runs(monkeypatch):
    """Fail the test if any stage starts."""
    from alignlab.lab import cache

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(cache.Lab, "stage", refuse)


@pytest.mark.parametrize("words, field, message", [
    (["dpo_betas="], "dpo_betas", "sweep is empty"),
    (["seeds="], "seeds", "at least 1 seed"),
    (["seeds=1,2,1"], "seeds", "repeated"),
    (["kl_budgets="], "kl_budgets", "at least one KL budget"),
    (["kl_budgets=2,-1"], "kl_budgets", "out of range"),
    (["kl_budgets=0"], "kl_budgets", "out of range"),
    (["kl_budgets=inf"], "kl_budgets", "finite"),
    (["kl_budgets=nan"], "kl_budgets", "finite"),
    (["methods=ppo,sft"], "methods", "unknown methods"),
    (["rs_ns=0"], "rs_ns", "out of range"),
    (["methods=bon", "bon_n=4", "kl_budgets=0.5,2"], "kl_budgets", "budget 2 nats is beyond"),
])
def test_bad_input_fails_before_any_stage(tmp_path, capsys, no_stage_runs, words, field, message):
    assert main(["lab", "study", "--quick", "--output-root", str(tmp_path), "progress=false", *words]) == 2
    err = capsys.readouterr().err
    assert f"field '{field}'" in err and message in err
    assert not (tmp_path / "study-quick").exists()


def test_a_sweep_may_be_empty_for_a_method_not_chosen():
    cfg = build_config(StudyConfig, overrides={"methods": "ppo,bon", "dpo_betas": ""})
    assert cfg.dpo_betas == [] and cfg.lab_config(3).name == "study/seed-3"
    assert cfg.lab_config(3).dpo_beta == 0.15  # the demo's default: the plain dpo stage is the demo's


def test_help_documents_every_study_option_with_its_range(capsys):
    with pytest.raises(SystemExit):
        main(["lab", "study", "--help"])
    out = capsys.readouterr().out
    for flag in ("--quick", "--seeds", "--ppo-kl-coefs", "--dpo-betas", "--ipo-betas", "--grpo-betas", "--rs-ns",
                 "--kl-budgets", "--ppo-iterations", "--curve-points"):
        assert flag in out
    assert "range: > 0" in out and "range: >= 1" in out


# ----------------------------------------------------------------------------------------------- the quick study


def test_quick_study_resumes_after_a_failure_then_reuses_every_stage(tmp_path, monkeypatch, capsys):
    from alignlab.lab import stages

    real_dpo = stages.Context.dpo

    def failing_dpo(self, folder, loss):  # DPO at beta 0.5 on the second seed fails mid-study
        if self.cfg.seed == 1 and self.cfg.dpo_beta == 0.5:
            raise RuntimeError("injected failure")
        return real_dpo(self, folder, loss)

    monkeypatch.setattr(stages.Context, "dpo", failing_dpo)
    argv = ["lab", "study", "--quick", "--output-root", str(tmp_path), "progress=false"]
    with pytest.raises(RuntimeError, match="injected failure"):
        main(argv)
    root = tmp_path / "study-quick"
    assert not (root / "study.md").exists() and not (root / "study.json").exists()  # only whole results
    assert (root / "seed-1" / "dpo" / "stage.json").exists()  # finished before the failure
    assert not (root / "seed-1" / "dpo@beta=0.5" / "stage.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("seed-*/*/stage.json")}
    assert len(stamps) == 14 + 10  # seed 0: 4 shared + 2 x (2 ppo + 2 dpo + 1 bon); seed 1 up to dpo@beta=0.5
    capsys.readouterr()

    monkeypatch.setattr(stages.Context, "dpo", real_dpo)
    assert main(argv) == 0  # resumes: the finished stages are reused, the rest run
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert "[lab] dpo@beta=0.5: running" in capsys.readouterr().out

    # the sweep value equal to the lab's default is the plain (demo's) stage; another value has its own
    params = {name: json.loads((root / "seed-0" / name / "stage.json").read_text())["params"]
              for name in ("dpo", "dpo@beta=0.5", "ppo", "ppo@kl_coef=0.5")}
    assert params["dpo"]["beta"] == 0.15 and params["dpo@beta=0.5"]["beta"] == 0.5
    assert params["ppo"]["kl_coef"] == 0.05 and params["ppo@kl_coef=0.5"]["kl_coef"] == 0.5

    report = (root / "study.md").read_text()
    assert "| method | swept | gold at KL <= 0.1 | gold at KL <= 0.5 |" in report
    for label in ("PPO (KL)", "DPO", "Best-of-n"):
        assert f"| {label} |" in report
    assert "At KL <= 0.1 nats" in report and "At KL <= 0.5 nats" in report and "DPO paper" in report
    assert (root / "frontiers.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (root / "study.html").read_text()
    summary = json.loads((root / "study.json").read_text())
    assert summary["dpo_paper"]["status"] in ("reproduced", "not reproduced", "mixed", "inconclusive")
    runs = summary["runs"]
    assert {(r["seed"], r["stage"]) for r in runs} == {(s, n) for s in (0, 1) for n in (
        "ppo", "ppo@kl_coef=0.5", "dpo", "dpo@beta=0.5", "bon")}
    dpo = next(r for r in runs if r["stage"] == "dpo")
    assert [p["step"] for p in dpo["points"]] == [1, 2]  # 2 checkpoints (quick: 2 steps), the last is the final
    assert all(set(p) >= {"kl", "gold", "gold_ci95"} for r in runs for p in r["points"])
    bon = next(r for r in runs if r["stage"] == "bon")
    assert [p["n"] for p in bon["points"]] == [1, 2, 4]
    assert bon["points"][1]["kl"] == pytest.approx(math.log(2) - 1 / 2)

    # a rerun reuses every stage; a budget beyond every frontier is an error naming it, after the cached stages
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[lab] ")]
    assert len(lines) == 28 and all(": cached (" in line for line in lines)
    assert "[study] 1/28 seed 0: sft cached" in out and "[study] 28/28 seed 1: eval_bon cached" in out
    assert main([*argv, "kl_budgets=0.1,50"]) == 2
    err = capsys.readouterr().err
    assert "KL budget 50 nats is beyond every method's frontier" in err and "largest KL reached" in err
