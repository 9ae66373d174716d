"""The study (``alignlab lab study``): each method's reward/KL frontier traced across its KL control and seeds, as
the DPO paper traced them by sweeping beta and taking checkpoints, then the methods compared at KL budgets.

    for each seed S:           a lab at OUTPUT_ROOT/NAME/seed-S (every option but the seed as the study's)
        shared stages          sft -> preferences -> reward_model -> eval_sft (as ``alignlab demo`` runs them)
        for each method:
            for each value of its KL control (ppo: kl_coef, dpo / ipo / grpo / rloo: beta, rs: n):
                train, evaluate along training (checkpoints) and at the end
    frontier per method and seed = upper envelope of its points and SFT (frontier.py)
    -> gold at each KL budget, mean and t-interval across seeds, paired differences -> study.md / .json / .html

A run at the lab's own value of its KL control is the plain stage (``dpo``: the demo's stage, the same key); another
value is its own stage (``dpo@beta=0.5``), its value in the stage's parameters. Every stage is cached by the lab, so
a study stopped by a failure resumes where it stopped when rerun; the study's own files are written at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

from alignlab.config import STUDY_SWEEPS, LabConfig
from alignlab.lab import stages
from alignlab.lab.frontier import Run, check_budgets_reached, method_frontiers
from alignlab.lab.pipeline import open_lab, run_method, run_shared_stages

SHARED_STAGES = ("sft", "preferences", "reward_model", "eval_sft")


# ----------------------------------------------------------------------------------------------- the plan


def sweep_values(cfg: Any, method: str) -> list[float | None]:
    """The values of ``method``'s KL control the study trains at (repeats dropped); [None] for a method without
    one (ppo_nokl, simpo, and best-of-n, whose curve over n is its sweep)."""
    sweep = STUDY_SWEEPS.get(method)
    return list(dict.fromkeys(getattr(cfg, sweep.option))) if sweep else [None]


def stage_name(method: str, value: float | None, lab_cfg: LabConfig) -> str:
    """``dpo`` when ``value`` is the lab's own (the demo's stage), else ``dpo@beta=0.5``."""
    sweep = STUDY_SWEEPS.get(method)
    if value is None or sweep is None or value == getattr(lab_cfg, sweep.lab_field):
        return method
    return f"{method}@{sweep.label}={value:.12g}"  # 12 digits: distinct values, distinct stages


def count_stages(cfg: Any) -> int:
    """Every stage of the study: per seed the shared stages, then a training and an evaluation per run."""
    runs = sum(len(sweep_values(cfg, m)) for m in cfg.methods)
    return len(cfg.seeds) * (len(SHARED_STAGES) + 2 * runs)


def check_budgets_up_front(cfg: Any) -> None:
    """When every method is best-of-n its largest KL is known before anything runs, log n - (n-1)/n at n =
    ``bon_n``: a budget beyond it is an error at once."""
    from alignlab.train.rejection import best_of_n_kl

    if set(cfg.methods) == {"bon"}:
        largest = best_of_n_kl(cfg.bon_n)
        check_budgets_reached(cfg.kl_budgets, largest, f"best-of-n at n = {cfg.bon_n} (log n - (n-1)/n)")


# ----------------------------------------------------------------------------------------------- running


def run_study(cfg: Any) -> Path:
    """Run (or reuse) every stage of every seed, then write study.md, study.json, frontiers.png and study.html;
    returns study.md's path. ``cfg`` is a :data:`alignlab.config.StudyConfig`."""
    from alignlab.lab.study_report import write_study_report

    check_budgets_up_front(cfg)
    start = time.perf_counter()
    progress = Progress(count_stages(cfg), enabled=cfg.progress)
    runs: list[Run] = []
    sft_gold: dict[int, float] = {}
    stage_results: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in cfg.seeds:
        ctx = open_lab(cfg.lab_config(seed))
        ctx.lab.after_stage = functools.partial(progress.stage_done, seed)
        run_shared_stages(ctx)
        sft_gold[seed] = ctx.lab.results["eval_sft"]["gold"]
        for method in cfg.methods:
            for value in sweep_values(cfg, method):
                runs.append(_train_and_evaluate(ctx, method, value))
        stage_results[seed] = ctx.lab.results
    progress.close()
    frontiers = method_frontiers(runs, sft_gold, cfg.kl_budgets)
    report = write_study_report(cfg, runs, frontiers, stage_results, time.perf_counter() - start)
    print(f"[study] report: {report} (and {report.with_suffix('.html')}, study.json, frontiers.png)")
    return report


class Progress:
    """One bar over every stage of the study (so its ETA counts them all) and a printed line per stage."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="study", unit="stage", disable=not enabled)
        self.total, self.done = total, 0  # counted here: a disabled bar counts nothing

    def stage_done(self, seed: int, name: str, result: dict[str, Any], cached: bool) -> None:
        self.done += 1
        self.bar.update(1)
        how = "cached" if cached else f"done in {result['wall_s']:.0f} s"
        self.bar.write(f"[study] {self.done}/{self.total} seed {seed}: {name} {how}")

    def close(self) -> None:
        self.bar.close()


def _train_and_evaluate(ctx: stages.Context, method: str, value: float | None) -> Run:
    """``method`` at ``value`` of its KL control: the lab's context with that value (so the stage's parameters,
    hence its key, hold it), trained and evaluated."""
    name = stage_name(method, value, ctx.cfg)
    swept = ctx
    if name != method:
        lab_field = STUDY_SWEEPS[method].lab_field
        swept = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, **{lab_field: value}))
    evaluation = run_method(swept, method, name)
    trained = ctx.lab.results[name]
    return Run(seed=ctx.cfg.seed, method=method, stage=name, value=value,
               points=evaluation_points(method, trained, evaluation), wall_s=trained["wall_s"],
               peak_rss_mb=trained["peak_rss_mb"])


def evaluation_points(method: str, trained: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's points {kl, gold, gold_ci95, step | n}: the held-out evaluations along training and at the end (the
    final model alone when ``curve_points`` = 0); best-of-n: its curve over n at the analytic KL bound (an interval
    only at the largest n, whose samples the evaluation scored)."""
    if method == "bon":
        return [{"n": c["n"], "kl": c["kl"], "gold": c["gold"],
                 "gold_ci95": evaluation["gold_ci95"] if c["n"] == trained["n"] else None}
                for c in trained["curve"]]
    curve = evaluation.get("curve") or [{"step": trained.get("optimizer_steps"), **evaluation}]
    return [{"step": c.get("step"), "kl": c["kl"], "gold": c["gold"], "gold_ci95": c.get("gold_ci95")}
            for c in curve]


