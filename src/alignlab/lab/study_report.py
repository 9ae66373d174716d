"""The study's report: ``study.md``, ``study.json``, ``frontiers.png`` and a self-contained ``study.html``, from the
runs' points and the frontiers of :mod:`alignlab.lab.study`.

The verdict at a KL budget compares the methods by the best gold their frontiers reach within it: the leader (the
highest mean over seeds) against every other method that reaches the budget, by their paired difference across seeds
(``frontier.paired_difference``); a difference whose 95% interval includes 0 is within noise, and the leader wins
only when no difference is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from alignlab.config import MODELS_IN_MEMORY, STUDY_SWEEPS  # noqa: E402
from alignlab.lab.cache import write_atomic  # noqa: E402
from alignlab.lab.frontier import (  # noqa: E402
    AtBudget,
    MethodFrontier,
    Run,
    envelope_at,
    mean_interval,
    paired_difference,
)
from alignlab.lab.report import COLORS, LABELS, _html, _md_table, _pm  # noqa: E402

# ----------------------------------------------------------------------------------------------- the verdict


def _golds(at: list[AtBudget]) -> list[float]:
    return [a.gold for a in at]


def _gold(at: list[AtBudget]) -> str:
    """A method's gold at a budget across seeds: ``mean ± t-interval`` (the mean alone with one seed)."""
    return _pm(*mean_interval(_golds(at)))


def reach_note(at: list[AtBudget]) -> str:
    """'' when every seed's frontier reaches the budget, 'not reached' when none does, else 'reached on k/S seeds'."""
    reached = sum(a.reached for a in at)
    return "" if reached == len(at) else "not reached" if reached == 0 else f"reached on {reached}/{len(at)} seeds"


def _names(methods: list[str]) -> str:
    return ", ".join(LABELS[m] for m in methods)


def budget_sentence(budget: float, at: dict[str, list[AtBudget]]) -> str:
    """Which method wins at KL <= ``budget``.

    The leader is the method with the highest mean gold over seeds. It wins when its paired difference with every
    other method whose frontier reaches the budget (on at least one seed) has a 95% interval above 0 (lower bound
    > 0); otherwise it only leads, and the methods it cannot be told apart from (interval including 0) are named.
    A method whose frontier ends before the budget on every seed is compared by its best at less KL (a method that
    needs less drift is a fair choice under the budget) and named as such; the sentence says when the leader
    reaches the budget on only some seeds.

    Args:
        budget: the KL budget, nats.
        at: method -> the gold its frontier reaches within the budget, one per seed (the same seeds, in the same
            order, for every method).
    """
    ranked = sorted(at, key=lambda m: -mean_interval(_golds(at[m])).mean)  # stable: ties keep the methods' order
    best, others = ranked[0], ranked[1:]
    head = f"At KL <= {budget:g} nats"
    note = reach_note(at[best])
    reach = (f" ({LABELS[best]}'s frontier ends before this budget: its best at less KL)" if note == "not reached"
             else f" ({LABELS[best]}'s frontier {note}; on the others its best at less KL)" if note else "")
    if not others:
        return f"{head} only {LABELS[best]} ran: gold {_gold(at[best])}{reach}."
    rivals = others
    unreached = [m for m in others if reach_note(at[m]) == "not reached"]
    skipped = (f" {_names(unreached)}: frontier ends before this budget on every seed, compared by its best at "
               "less KL." if unreached else "")
    diffs = {m: paired_difference(_golds(at[best]), _golds(at[m])) for m in rivals}
    runner = rivals[0]
    if all(math.isnan(d.half_width) for d in diffs.values()):
        return (f"{head} {LABELS[best]} is ahead ({_gold(at[best])} against {LABELS[runner]}'s {_gold(at[runner])}), "
                f"but with one seed there is no interval to tell it from noise{reach}.{skipped}")
    close = [m for m, d in diffs.items() if not d.low > 0]  # includes 0 (the leader's mean is the highest)
    if not close:
        return (f"{head} {LABELS[best]} wins: gold {_gold(at[best])}, {_pm(*diffs[runner])} above the runner-up "
                f"{LABELS[runner]} ({_gold(at[runner])}), and its paired difference with every other method "
                f"excludes 0 (paired across {len(at[best])} seeds){reach}.{skipped}")
    return (f"{head} {LABELS[best]} leads (gold {_gold(at[best])}){reach}; within noise of "
            + "; ".join(f"{LABELS[m]} ({_gold(at[m])}; paired difference {_pm(*diffs[m])} includes 0)" for m in close)
            + f".{skipped}")


def dpo_paper_verdict(by_budget: dict[float, dict[str, list[AtBudget]]]) -> tuple[str, str]:
    """Whether the DPO paper's IMDb finding (DPO's frontier dominates PPO's) holds here, as (status, sentence).

    Over the budgets both frontiers reach (each on at least one seed), with d = DPO - PPO paired across seeds:
    ``not reproduced`` when d's 95% interval is below 0 at some budget (PPO significantly better); ``reproduced``
    when mean d >= 0 at every such budget and d's interval is above 0 at one; ``mixed`` when d's interval is above
    0 at one budget but PPO's mean is higher (within noise) at another, naming where each leads; else
    ``inconclusive``; ``not tested`` when the study did not run both.
    """
    if not all("dpo" in at and "ppo" in at for at in by_budget.values()):
        return "not tested", "The DPO paper's IMDb finding (DPO's frontier dominates PPO's) is not tested: the " \
                             "study did not run both dpo and ppo."
    shared = {b: paired_difference(_golds(at["dpo"]), _golds(at["ppo"])) for b, at in by_budget.items()
              if reach_note(at["dpo"]) != "not reached" and reach_note(at["ppo"]) != "not reached"}
    claim = "The DPO paper's IMDb finding (DPO's reward/KL frontier dominates PPO's)"
    if not shared:
        return "inconclusive", f"{claim} cannot be checked here: no budget is reached by both frontiers."
    listed = "; ".join(f"{b:g} nats: DPO - PPO = {_pm(*d)}" for b, d in shared.items())
    ppo_ahead = [b for b, d in shared.items() if d.high < 0]
    if ppo_ahead:
        return "not reproduced", f"{claim} is **not reproduced**: PPO is significantly better at " \
                                 f"{', '.join(f'{b:g}' for b in ppo_ahead)} nats ({listed})."
    dpo_ahead = [b for b, d in shared.items() if d.low > 0]
    ppo_mean_ahead = [b for b, d in shared.items() if d.mean < 0]
    if dpo_ahead and not ppo_mean_ahead:
        return "reproduced", f"{claim} is **reproduced**: DPO is at least as good at every budget both reach and " \
                             f"significantly better at one ({listed})."
    if dpo_ahead:
        return "mixed", (f"{claim} is **mixed** here: DPO is significantly better at "
                         f"{', '.join(f'{b:g}' for b in dpo_ahead)} nats, while PPO's mean is higher (within noise) at "
                         f"{', '.join(f'{b:g}' for b in ppo_mean_ahead)} nats ({listed}).")
    return "inconclusive", f"{claim} is **inconclusive** here: the differences are within noise ({listed})."


# ----------------------------------------------------------------------------------------------- tables


def verdict_rows(cfg: Any, runs: list[Run], frontiers: dict[str, MethodFrontier]) -> list[dict[str, Any]]:
    """One row per method: the gold at each budget (mean, interval, reach), its sweep, training cost and memory."""
    rows = []
    for method, frontier in frontiers.items():
        mine = [r for r in runs if r.method == method]
        sweep = STUDY_SWEEPS.get(method)
        rows.append({
            "method": method,
            "sweep": (f"{sweep.label} = " + ", ".join(f"{v:g}" for v in dict.fromkeys(r.value for r in mine))
                      if sweep else f"n = 1 .. {cfg.bon_n}" if method == "bon" else "-"),
            "budgets": {str(b): {"mean": (iv := mean_interval(_golds(at))).mean, "ci95": iv.half_width,
                                 "per_seed": _golds(at), "reached": [a.reached for a in at], "note": reach_note(at)}
                        for b, at in frontier.at_budget.items()},
            "max_kl": frontier.max_kl,
            "train_wall_s": sum(r.wall_s for r in mine) / len(mine),
            "peak_rss_mb": max(r.peak_rss_mb for r in mine),
            "models": MODELS_IN_MEMORY.get(method, ""),
        })
    return rows


def _verdict_table(cfg: Any, rows: list[dict[str, Any]]) -> str:
    head = ["method", "swept", *[f"gold at KL <= {b:g}" for b in cfg.kl_budgets], "train time per run (s)",
            "peak RSS (MiB)", "models held in memory"]
    body = []
    for r in rows:
        cells = []
        for b in cfg.kl_budgets:
            cell = r["budgets"][str(b)]
            text = _pm(cell["mean"], cell["ci95"])
            cells.append(f"{text} ({cell['note']})" if cell["note"] else text)
        body.append([LABELS[r["method"]], r["sweep"], *cells, f"{r['train_wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     r["models"]])
    return _md_table(head, body)


def checkpoints(cfg: Any) -> str:
    """How many models along training each method's run is evaluated at, besides its end: ``curve_points``, but
    ``nokl_curve_points`` for PPO at beta = 0 and the earlier rounds for rejection sampling."""
    if not cfg.curve_points and "ppo_nokl" not in cfg.methods:
        return "no checkpoints"
    parts = [f"{cfg.curve_points} checkpoints per run"]
    if "ppo_nokl" in cfg.methods:
        parts.append(f"PPO at beta = 0: {cfg.nokl_curve_points}")
    if "rs" in cfg.methods and cfg.curve_points:
        parts.append(f"rejection sampling: the end of each of its first {cfg.rs_rounds - 1} round(s)")
    if "bon" in cfg.methods:
        parts.append("best-of-n: its curve over n")
    return "; ".join(parts)


def stage_kind(name: str) -> str:
    """``eval_dpo@beta=0.5`` -> ``eval_dpo``: a stage's kind, whatever its KL control."""
    return name.split("@")[0]


def stage_times(stage_results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per stage kind: how many stages and their summed wall time (s), as each was computed (a cached stage counts
    the time it took when it ran)."""
    kinds: dict[str, dict[str, float]] = {}
    for results in stage_results.values():
        for name, result in results.items():
            kind = kinds.setdefault(stage_kind(name), {"stages": 0, "wall_s": 0.0})
            kind["stages"] += 1
            kind["wall_s"] += result.get("wall_s", 0.0)
    return kinds


# ----------------------------------------------------------------------------------------------- the plot


def plot_frontiers(cfg: Any, runs: list[Run], frontiers: dict[str, MethodFrontier], path: Path) -> Path:
    """Every method's frontier: the mean over seeds of its envelopes (a line), the 95% t-band across seeds, and
    the raw points of every run faint; dotted lines at the KL budgets."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, frontier in frontiers.items():
        color = COLORS.get(method, "#444444")
        pts = [p for r in runs if r.method == method for p in r.points]
        ax.scatter([p["kl"] for p in pts], [p["gold"] for p in pts], s=10, alpha=0.25, color=color)
        top = max(frontier.max_kl)
        xs = [top * i / 100 for i in range(101)]
        at = [mean_interval([envelope_at(e, x).gold for e in frontier.envelopes]) for x in xs]
        ax.plot(xs, [a.mean for a in at], color=color, lw=2, label=LABELS.get(method, method))
        if len(frontier.seeds) > 1:
            ax.fill_between(xs, [a.low for a in at], [a.high for a in at], color=color, alpha=0.15, lw=0)
    for b in cfg.kl_budgets:
        ax.axvline(b, color="#888888", ls=":", lw=1)
    ax.set_xlabel("KL(policy || SFT reference), nats per response")
    ax.set_ylabel("gold score (held-out mean)")
    ax.set_title(f"Reward / KL frontiers: mean over {len(cfg.seeds)} seed(s), 95% band")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")  # written whole, then renamed
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- the report


def write_study_report(cfg: Any, runs: list[Run], frontiers: dict[str, MethodFrontier],
                       stage_results: dict[int, dict[str, dict[str, Any]]], elapsed_s: float) -> Path:
    """Write frontiers.png, study.json, study.md and study.html into OUTPUT_ROOT/NAME; returns study.md."""
    root = Path(cfg.output_root) / cfg.name
    plot_frontiers(cfg, runs, frontiers, root / "frontiers.png")
    rows = verdict_rows(cfg, runs, frontiers)
    by_budget = {b: {m: f.at_budget[b] for m, f in frontiers.items()} for b in cfg.kl_budgets}
    sentences = [budget_sentence(b, at) for b, at in by_budget.items()]
    status, dpo_sentence = dpo_paper_verdict(by_budget)
    times = stage_times(stage_results)
    total_s = sum(k["wall_s"] for k in times.values())
    md = "\n".join([
        f"# alignlab study: {cfg.name}",
        "",
        f"Task **{cfg.task}**, model `{cfg.model}`, seeds {', '.join(map(str, cfg.seeds))} (one lab each: its own "
        "SFT model, preference data and reward model); every method trained at each value of its KL control and "
        f"evaluated along training ({checkpoints(cfg)}) and at the end on {cfg.n_eval} held-out prompts.",
        "",
        "## The answer",
        "",
        *[f"- {s}" for s in sentences],
        f"- {dpo_sentence}",
        "",
        _verdict_table(cfg, rows),
        "",
        "Gold at a budget = the best held-out gold the method's frontier reaches at KL <= the budget (linear between "
        "frontier points: a mixture of two models reaches it), mean ± the 95% t-interval across seeds "
        "(t_{0.975, S-1} sd / sqrt(S)). A frontier is the upper envelope of every checkpoint and final model of all "
        "the method's runs on one seed, with the SFT model at KL 0. An envelope is a maximum over noisy points, so it "
        "is biased upward, the more so the more points it takes and the noisier they are (checkpoints are scored on "
        f"{cfg.curve_answers} answer(s) per prompt, final models on {cfg.eval_answers}): a method with more runs or "
        "checkpoints is favoured. *reached on k/S seeds*: on only k of the S seeds did one of the method's models "
        "spend that much KL; on the others the value is its best at less KL. *not reached*: on no seed. Winner: the "
        "highest mean whose difference to every other method that reaches the budget, paired by seed, has a 95% "
        "interval above 0; otherwise the leader and the methods within noise of it are named. Train time: mean wall "
        "time of one training stage; peak RSS: the largest over its training stages. Best-of-n's KL is the analytic "
        "bound log n - (n-1)/n.",
        "",
        "## Frontiers",
        "",
        "![frontiers](frontiers.png)",
        "",
        "## Wall time",
        "",
        _md_table(["stage kind", "stages", "total (s)", "mean (s)"],
                  [[k, f"{v['stages']:.0f}", f"{v['wall_s']:.1f}", f"{v['wall_s'] / v['stages']:.1f}"]
                   for k, v in times.items()]),
        "",
        f"The stages took {total_s:.0f} s in all (each as long as it took when it ran); this invocation took "
        f"{elapsed_s:.0f} s (cached stages reused).",
        "",
    ])
    summary = {"config": dataclasses.asdict(cfg), "verdict": rows, "sentences": sentences,
               "dpo_paper": {"status": status, "sentence": dpo_sentence},
               "frontiers": {m: {"seeds": f.seeds, "envelopes": f.envelopes, "max_kl": f.max_kl}
                             for m, f in frontiers.items()},
               "runs": [dataclasses.asdict(r) for r in runs], "stage_times": times, "total_stage_s": total_s,
               "elapsed_s": elapsed_s}
    write_atomic(root / "study.json", json.dumps(summary, indent=1, default=float))
    report = write_atomic(root / "study.md", md)
    write_atomic(root / "study.html", _html(md, root))
    return report
