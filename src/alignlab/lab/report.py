"""The lab's report: ``report.md`` and a self-contained ``report.html`` (plots embedded as PNG), both built
from the stage results of this run only."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from alignlab.config import MODELS_IN_MEMORY  # noqa: E402
from alignlab.data.templates import alpaca_input  # noqa: E402
from alignlab.evaluate import gap_closed  # noqa: E402
from alignlab.lab.cache import Lab  # noqa: E402
from alignlab.lab.overoptimization import Fit, analyze, gains, json_safe  # noqa: E402
from alignlab.tasks import Task  # noqa: E402

LABELS = {"sft": "SFT", "ppo": "PPO (KL)", "ppo_nokl": "PPO (beta=0)", "grpo": "GRPO", "rloo": "RLOO",
          "dpo": "DPO", "ipo": "IPO",
          "simpo": "SimPO", "rs": "Rejection sampling", "bon": "Best-of-n"}
COLORS = {"sft": "#444444", "ppo": "#1f77b4", "ppo_nokl": "#d62728", "grpo": "#bcbd22", "rloo": "#e377c2",
          "dpo": "#2ca02c", "ipo": "#9467bd",
          "simpo": "#8c564b", "rs": "#ff7f0e", "bon": "#17becf"}
TARGET_KL = 10.0  # nats: a method meets the target at no more KL than this


def target(method: str, gap: float, gap_lo: float, gap_hi: float, within_budget: bool) -> str:
    """Whether a method met the target (half the gap closed within the KL and fluency budgets): "yes" when the
    whole gap-closed interval is at or above 50 %, "no" when it is below (or the budgets are broken), and "within
    noise" when the interval straddles 50 %: another seed may put the method on either side."""
    if method == "sft":
        return "-"
    if not within_budget:
        return "no"
    if gap_lo != gap_lo or gap_hi != gap_hi:  # no interval (best-of-n at n = 1 has none to straddle)
        return "yes" if gap >= 0.5 else "no"
    return "yes" if gap_lo >= 0.5 else "no" if gap_hi < 0.5 else "within noise"


def summary_rows(lab: Lab) -> list[dict[str, Any]]:
    """One row per method (SFT first) with the report's columns."""
    sft_eval = lab.results["eval_sft"]
    sft_gold, sft_nll = sft_eval["gold"], sft_eval.get("fluency_nll", float("nan"))
    rows = []
    nan = float("nan")
    for method in ["sft", *[m for m in lab.cfg.methods if f"eval_{m}" in lab.results]]:
        ev = sft_eval if method == "sft" else lab.results[f"eval_{method}"]
        trained = lab.results["sft" if method == "sft" else method]
        gap = 0.0 if method == "sft" else ev["gap_closed"] if "gap_closed" in ev else \
            gap_closed(np.array([ev["gold"]]), np.array([sft_gold]))  # older results: from the means alone
        fluency = ev.get("fluency_nll", nan)
        kl = ev.get("kl", 0.0)
        within_budget = kl <= TARGET_KL and fluency <= sft_nll + 1.0
        gap_lo, gap_hi = ev.get("gap_closed_lo", nan), ev.get("gap_closed_hi", nan)
        met = target(method, gap, gap_lo, gap_hi, within_budget)
        rows.append({
            "method": method, "gold": ev["gold"], "gold_ci95": ev["gold_ci95"],
            "vader": ev.get("vader"), "vader_ci95": ev.get("vader_ci95"),
            "proxy": ev.get("proxy"), "proxy_ci95": ev.get("proxy_ci95"),
            "kl": kl, "kl_ci95": ev.get("kl_ci95"), "fluency_nll": fluency, "distinct_2": ev["distinct_2"],
            "win_rate": ev.get("win_rate", 0.5), "win_rate_lo": ev.get("win_rate_lo"),
            "win_rate_hi": ev.get("win_rate_hi"),
            "gap_closed": gap, "gap_closed_lo": ev.get("gap_closed_lo"), "gap_closed_hi": ev.get("gap_closed_hi"),
            "meets_target": met == "yes", "target": met,
            "prompts": ev.get("prompts", ev["n"]), "answers": ev["n"],
            "wall_s": trained["wall_s"], "peak_rss_mb": trained["peak_rss_mb"],
            "samples": trained.get("samples", trained.get("examples")),
            "optimizer_steps": trained.get("optimizer_steps"), "models": MODELS_IN_MEMORY.get(method, ""),
            "length": ev["length"],
        })
    return rows


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


# ----------------------------------------------------------------------------------------------- plots


def held_out_curve(lab: Lab, method: str) -> list[dict[str, Any]]:
    """The method's held-out evaluations along training (checkpoints, then the end), or []."""
    return lab.results.get(f"eval_{method}", {}).get("curve") or []


def plot_frontier(lab: Lab, rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sft_gold = lab.results["eval_sft"]["gold"]
    for r in rows:  # every trained method starts at the SFT model (KL 0)
        curve = held_out_curve(lab, r["method"])
        if curve:
            ax.plot([0.0, *[c["kl"] for c in curve]], [sft_gold, *[c["gold"] for c in curve]], "o-", alpha=0.45,
                    ms=3, lw=1, color=COLORS[r["method"]])
    for method in ("ppo", "ppo_nokl", "grpo", "rloo"):
        curve = lab.results.get(method, {}).get("curve") or []
        if curve and not held_out_curve(lab, method):
            ax.plot([c["kl"] for c in curve], [c["gold"] for c in curve], "o--", alpha=0.5, ms=3,
                    color=COLORS[method], label=f"{LABELS[method]} along training (rollouts)")
    bon = lab.results.get("bon", {}).get("curve") or []
    if bon:
        ax.plot([c["kl"] for c in bon], [c["gold"] for c in bon], "s-", color=COLORS["bon"], ms=4,
                label="Best-of-n, n = " + ", ".join(str(c["n"]) for c in bon) + " (KL bound)")
    for r in rows:
        ax.errorbar(r["kl"], r["gold"], yerr=r["gold_ci95"], fmt="*", ms=12, color=COLORS[r["method"]],
                    label=f"{LABELS[r['method']]} (held-out)")
    ax.set_xlabel("KL(policy || SFT reference), nats per response")
    ax.set_ylabel("gold score (held-out mean)")
    ax.set_title("Reward / KL frontier")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fit_line(ax: Any, fit: dict[str, Any], d_max: float, style: str, color: str, label: str) -> bool:
    """Draw a fitted form (:class:`Fit` as a dict) from d = 0 to ``d_max``; False when the fit failed."""
    if "error" in fit:
        return False
    form = Fit(**fit)
    grid = [d_max * i / 100 for i in range(101)]
    ax.plot(grid, [form(d) for d in grid], style, color=color, lw=1.8, label=label)
    return True


def plot_overoptimization(lab: Lab, analysis: dict[str, Any], path: Path) -> Path | None:
    """Gao et al.'s picture: gains over the SFT model against d = sqrt(KL), gold solid and calibrated proxy
    dashed, each run's points with its fitted form (RL for PPO, best-of-n for best-of-n); on the right the PPO
    runs' training rollouts per iteration (thin)."""
    runs = analysis["runs"]
    if not runs:
        return None
    fig, (held, rollouts) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run, fits in runs.items():
        points, color = fits["points"], COLORS[run]
        d = [p["d"] for p in points]
        gold, proxy = [p["gold_gain"] for p in points], [p["proxy_gain"] for p in points]
        ci = [p["gold_ci95"] if p["gold_ci95"] is not None else 0.0 for p in points]
        marker = "s" if run == "bon" else "o"
        held.errorbar(d, gold, yerr=ci, fmt=marker, ms=4, capsize=2, color=color)
        held.plot(d, proxy, "x", ms=6, color=color)
        form = "best-of-n form" if run == "bon" else "RL form"
        for key, style, values, what in (("fit_gold", "-", gold, "gold"), ("fit_proxy", "--", proxy, "proxy")):
            label = f"{LABELS[run]}: {what} ({form})"
            if not _fit_line(held, fits[key], max(d) * 1.05, style, color, label):  # too few points: join them
                held.plot(d, values, style, lw=1, color=color, label=f"{LABELS[run]}: {what} (no fit)")
    held.axhline(0.0, color="#999999", lw=0.8)
    held.set_xlabel("d = sqrt(KL to the SFT model)  (nats^0.5)")
    held.set_ylabel("gain over the SFT model (gold units)")
    held.set_title("Held out: gold (solid) and calibrated proxy (dashed)")
    held.legend(fontsize=7, loc="best")
    slope = analysis["calibration"]["slope"]
    for run in ("ppo", "ppo_nokl"):
        curve = lab.results.get(run, {}).get("curve") or []
        if not curve:
            continue
        g = gains(curve, slope)  # over the first rollout
        rollouts.plot(g["d"], g["gold"], "-", lw=0.9, marker=".", color=COLORS[run], label=f"{LABELS[run]}: gold")
        if analysis["proxy_is_reward_model"]:
            rollouts.plot(g["d"], g["proxy"], "--", lw=0.9, marker=".", color=COLORS[run],
                          label=f"{LABELS[run]}: proxy")
    rollouts.axhline(0.0, color="#999999", lw=0.8)
    rollouts.set_xlabel("d = sqrt(KL of the rollouts)  (nats^0.5)")
    rollouts.set_ylabel("gain over the first rollout (gold units)")
    rollouts.set_title("Along training, per iteration (training rollouts)")
    if rollouts.get_legend_handles_labels()[0]:
        rollouts.legend(fontsize=7, loc="best")
    for ax in (held, rollouts):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(lab: Lab, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    sft = lab.results["sft"].get("curve") or []
    axes[0].plot(range(1, len(sft) + 1), sft, color=COLORS["sft"])
    axes[0].set_title("SFT loss")
    axes[0].set_xlabel("step")
    for method in ("dpo", "ipo", "simpo"):
        curve = lab.results.get(method, {}).get("curve") or []
        if curve:
            axes[1].plot([c["step"] for c in curve], [c["margin"] for c in curve], color=COLORS[method],
                         label=LABELS[method])
    axes[1].set_title("implicit reward margin (chosen - rejected)")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    for method in ("ppo", "ppo_nokl", "grpo", "rloo"):
        curve = lab.results.get(method, {}).get("curve") or []
        if curve:
            axes[2].plot([c["iteration"] for c in curve], [c["proxy"] for c in curve], color=COLORS[method],
                         label=LABELS[method])
    axes[2].set_title("online RL: mean reward of rollouts")
    axes[2].set_xlabel("iteration")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_costs(rows: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [LABELS[r["method"]] for r in rows]
    colors = [COLORS[r["method"]] for r in rows]
    axes[0].barh(names, [r["wall_s"] for r in rows], color=colors)
    axes[0].set_xlabel("training wall time (s)")
    axes[1].barh(names, [r["peak_rss_mb"] for r in rows], color=colors)
    axes[1].set_xlabel("peak RSS during training (MiB)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- text


def _pm(value: Any, half_width: Any, digits: int = 3) -> str:
    """``0.712 ± 0.031``: a value and the half-width of its interval; the value alone when there is no interval
    (None, or nan: one answer, one seed), "-" without a value."""
    if value is None:
        return "-"
    no_interval = half_width is None or (isinstance(half_width, float) and math.isnan(half_width))
    return _fmt(value, digits) + ("" if no_interval else f" ± {_fmt(half_width, digits)}")


def _range(value: Any, lo: Any, hi: Any, percent: bool = False) -> str:
    """``value [lo, hi]`` (a bootstrap interval, not symmetric), in percent or with 2 digits."""
    if value is None:
        return "-"
    show = (lambda x: "nan" if x != x else f"{x:.0%}") if percent else (lambda x: _fmt(x, 2))
    return show(value) + (f" [{show(lo)}, {show(hi)}]" if lo is not None and hi is not None else "")


def _scorer_label(name: str) -> str:
    """A reported scorer's name as the report writes it (``vader`` -> ``VADER``)."""
    return "VADER" if name == "vader" else name


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "gold (95% CI)", "VADER (95% CI)", "proxy", "KL (95% CI)", "fluency NLL/token", "distinct-2",
            "win rate vs SFT [95% CI]", "gap closed [95% CI]", "target met", "train time (s)", "peak RSS (MiB)",
            "samples", "opt. steps", "models held in memory"]
    body = []
    for r in rows:
        sft = r["method"] == "sft"
        body.append([
            LABELS[r["method"]], _pm(r["gold"], r["gold_ci95"]), _pm(r.get("vader"), r.get("vader_ci95")),
            _fmt(r["proxy"]), _pm(r["kl"], r.get("kl_ci95"), 2),
            _fmt(r["fluency_nll"], 2), _fmt(r["distinct_2"], 2),
            "-" if sft else _range(r["win_rate"], r.get("win_rate_lo"), r.get("win_rate_hi")),
            "-" if sft else _range(r["gap_closed"], r.get("gap_closed_lo"), r.get("gap_closed_hi"), percent=True),
            r["target"],
            f"{r['wall_s']:.0f}", f"{r['peak_rss_mb']:.0f}", _fmt(r["samples"]), _fmt(r["optimizer_steps"]),
            r["models"],
        ])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _examples(lab: Lab, n: int = 3) -> list[tuple[str, list[tuple[str, str]]]]:
    """The first answer of each method to each of the first ``n`` held-out prompts."""
    out = []
    methods = ["sft", *[m for m in lab.cfg.methods if f"eval_{m}" in lab.results]]
    prompts = _eval_inputs(lab)
    for i in range(min(n, len(prompts))):
        answers = []
        for m in methods:
            ev = lab.results["eval_sft" if m == "sft" else f"eval_{m}"]
            first = ev.get("prompt_index", list(range(len(ev["examples"])))).index(i)
            answers.append((LABELS[m], f"{ev['examples'][first]!s}  (gold {ev['gold_scores'][first]:+.2f})"))
        out.append((prompts[i], answers))
    return out


def _eval_inputs(lab: Lab) -> list[str]:
    """The held-out prompts' inputs, in prompt-index order (each once)."""
    rows = [json.loads(line) for line in (lab.root / "eval_sft" / "samples.jsonl").read_text().splitlines()]
    firsts = {r.get("prompt_index", i): r["prompt"] for i, r in reversed(list(enumerate(rows)))}
    return [alpaca_input(firsts[j]) for j in sorted(firsts)]


def write_report(lab: Lab, task: Task) -> Path:
    """Write report.md, report.html and the PNG plots into the lab's folder."""
    rows = summary_rows(lab)
    root = lab.root
    analysis = analyze(lab.results, TARGET_KL, proxy_is_reward_model=task.reward is None)
    plots = {
        "frontier": plot_frontier(lab, rows, root / "frontier.png"),
        "overoptimization": plot_overoptimization(lab, analysis, root / "overoptimization.png"),
        "training": plot_training(lab, root / "training.png"),
        "costs": plot_costs(rows, root / "costs.png"),
    }
    (root / "summary.json").write_text(json.dumps(rows, indent=1, default=float))
    (root / "overoptimization.json").write_text(json.dumps(json_safe(analysis), indent=1))
    cfg = lab.cfg
    prefs, rm, sft_eval = lab.results["preferences"], lab.results["reward_model"], lab.results["eval_sft"]
    head, body = _table(rows)
    compared = [r for r in rows if r["method"] not in ("sft", "ppo_nokl", "bon")]
    missed = [LABELS[r["method"]] for r in compared if r["target"] == "no"]
    line = sft_eval["gold"] + (1.0 - sft_eval["gold"]) / 2
    # a method whose gap-closed interval straddles 50 % could fall either side of the line in another run
    near = [LABELS[r["method"]] for r in compared if r["target"] == "within noise"]
    n_prompts, n_answers = sft_eval.get("prompts", len(sft_eval["gold_scores"])), len(sft_eval["gold_scores"])
    per_prompt = n_answers // max(1, n_prompts)
    rank_agreement = [f"{_scorer_label(name)}: {sft_eval[f'gold_{name}_spearman']:.2f}" for name in task.reports
                      if f"gold_{name}_spearman" in sft_eval]
    intro = [
        f"# alignlab lab report: {cfg.name}",
        "",
        f"Task **{task.name}**: {task.description}. Base model `{cfg.model}`; {cfg.n_train} training prompts, "
        f"{n_prompts} held-out prompts x {per_prompt} answers; responses of up to {cfg.max_new_tokens} tokens; "
        f"{'LoRA (r=16)' if cfg.lora else 'full fine-tuning'}; seed {cfg.seed}.",
        "",
        "## The answer",
        "",
        f"The SFT model's held-out gold score is {sft_eval['gold']:.3f} (the base model's: "
        f"{sft_eval['base_gold']:.3f}); the maximum is 1.0. A method meets the target when it closes at least half "
        f"of that gap at a KL of at most {TARGET_KL:g} nats with fluency no more than 1 nat/token worse than SFT's. "
        + (f"Missed here: {', '.join(missed)}." if missed
           else "" if near else "Every trained method met it in this run.")
        + (f" The line (half the gap closed) is at gold {line:.3f}; the gap-closed interval of "
           f"{', '.join(near)} straddles 50 % (\"within noise\"): another run (seed) may put "
           f"{'it' if len(near) == 1 else 'them'} on either side." if near else ""),
        "",
        _md_table(head, body),
        "",
        f"Columns: gold = the simulated user's score, {task.gold_formula or 'the task scorer'}, of {per_prompt} "
        f"sampled answer(s) per held-out prompt (temperature 1, the same random stream for every model, so "
        "answers are paired by prompt)"
        + (f"; on the SFT model's answers its rank correlation (Spearman) with {', '.join(rank_agreement)} (1 = the "
           "same order)" if rank_agreement else "")
        + ("; " + ", ".join(map(_scorer_label, task.reports)) + " = the reported scorer alone"
           if task.reports else "")
        + "; proxy = the trained reward model's score; KL = sum over response "
        "tokens of log pi - log ref on the policy's own samples, reference = the SFT model (best-of-n: the "
        "analytic bound log n - (n-1)/n); fluency = the SFT model's negative log-likelihood per token of the "
        "responses; win rate = per prompt, the share of (method answer, SFT answer) pairs whose gold is higher "
        "(ties 1/2), averaged over prompts; gap closed = (gold - gold of SFT) / (1 - gold of SFT); target met = "
        "yes / no, or within noise when the gap-closed interval straddles 50 %; "
        "samples = responses generated for training (SFT: demonstrations); opt. steps = optimizer steps.",
        "",
        f"Intervals: the prompt is the unit ({n_prompts} held-out prompts x {per_prompt} answers), since answers to "
        "one prompt are correlated. ± = 1.96 x the standard deviation of the per-prompt means / sqrt(prompts) "
        "around the mean of the per-prompt means; [lo, hi] = 2.5 and 97.5 percentiles of 2000 paired bootstrap "
        "resamples of the prompts (the method's and SFT's answers to a prompt drawn together).",
        "",
        "## Budgets",
        "",
        f"- Preference data: {prefs['samples']} SFT samples ({cfg.k_annotate} per training prompt) ranked by "
        f"simulated annotators (Plackett-Luce temperature {cfg.annotator_temperature}): {prefs['rankings']} "
        f"rankings, {prefs['pairs']} pairs; agreement of the annotators' pairs with the exact gold order "
        f"{prefs['pairwise_agreement_with_gold']:.2f}"
        + (f"; {prefs['unfinished']} of the samples were cut at {cfg.max_new_tokens} tokens, and the DPO family "
           "learns them without an end-of-sequence token." if "unfinished" in prefs else "."),
        f"- Reward model: {rm['optimizer_steps']} steps, K-wise loss on the rankings; held-out: "
        + ", ".join(f"{k} {v:.3f}" for k, v in rm.get("eval", {}).items() if isinstance(v, float)) + ".",
        f"- DPO / IPO / SimPO: the same {prefs['pairs']} pairs, {cfg.dpo_steps} steps each of {cfg.dpo_batch_size} "
        f"whole rankings (all their pairs, each answer encoded once), lr {cfg.dpo_lr:g}; DPO beta {cfg.dpo_beta:g}, "
        f"IPO tau {cfg.ipo_beta:g}, SimPO beta 2 and gamma 1. PPO: "
        f"{cfg.ppo_iterations} rollouts of {cfg.ppo_rollout} responses ({cfg.ppo_responses_per_prompt} per prompt) "
        f"on the same training prompts, {cfg.ppo_epochs} epochs over each; PPO at beta = 0: {cfg.ppo_nokl_iterations} "
        f"rollouts, evaluated at {cfg.nokl_curve_points} checkpoints along the way (it needs the length to "
        f"overoptimize). GRPO / RLOO: {cfg.grpo_iterations} "
        f"rollouts of {cfg.ppo_rollout} responses in groups of {cfg.grpo_group_size} (the group is the baseline; no "
        f"value model), {cfg.grpo_epochs} epochs over each, lr {cfg.grpo_lr:g}, beta {cfg.grpo_beta:g}. "
        + ("The RL methods, rejection sampling and best-of-n optimise the task's verifiable reward itself (the "
           "checked answer), not the reward model. " if task.reward is not None else "")
        + "Rejection "
        f"sampling: {cfg.rs_rounds} round(s), each {cfg.rs_n} samples per training prompt from the current policy, "
        f"the best by the reward model kept (one cut at the limit is learned without EOS), then {cfg.rs_steps} SFT "
        f"steps on them, lr {cfg.rs_lr:g}{_rs_by_round(lab)}. "
        f"Best-of-n: n up to {cfg.bon_n} at inference, picked by the reward model.",
        "",
        "## Reward / KL frontier",
        "",
        "![frontier](frontier.png)",
        "",
        "Each star is a method's final model on the held-out prompts (with its 95% interval); "
        + ("the thin line behind it follows the same method along training, from the SFT model (KL 0) through "
           f"checkpoints evaluated the same way on {cfg.curve_answers} answer(s) per held-out prompt (rejection "
           "sampling: the end of each round); "
           if cfg.curve_points else "dashed lines follow PPO along training on its rollouts; ")
        + "the best-of-n line is the cheapest way to trade KL for reward and the baseline for the others.",
        "",
        *_along_training(lab, rows),
    ]
    intro += _overoptimization_section(lab, analysis, plots["overoptimization"] is not None)
    intro += ["## Training curves", "", "![training](training.png)", "", "## Time and memory", "",
              "![costs](costs.png)", "", "## Example generations (held-out prompts)", ""]
    for prompt, answers in _examples(lab):
        intro += [f"**Prompt:** {prompt}", ""]
        intro += [f"- *{name}*: {text.strip()}" for name, text in answers]
        intro += [""]
    intro += ["## Stage times", ""]
    intro += [f"- {name}: {res['wall_s']:.0f} s" for name, res in lab.results.items()]
    md = "\n".join(intro) + "\n"
    report = root / "report.md"
    report.write_text(md)
    (root / "report.html").write_text(_html(md, root))
    return report


def _overoptimization_section(lab: Lab, analysis: dict[str, Any], plotted: bool) -> list[str]:
    """The report's "Reward hacking (overoptimization)" section: Gao et al.'s plot, the fitted forms per run and
    the verdicts (the unpenalized run's fall, the penalty's hold on KL, SimPO's drift), each from the numbers."""
    lines = [line for sentence in (_fall_sentence(lab, analysis), _kl_sentence(analysis),
                                   _simpo_sentence(lab, analysis)) if sentence for line in (sentence, "")]
    if not plotted and not lines:
        return []
    out = ["## Reward hacking (overoptimization)", ""]
    if plotted:
        cal = analysis["calibration"]
        out += [
            "![overoptimization](overoptimization.png)", "",
            "Drawn as Gao et al. 2022 (\"Scaling Laws for Reward Model Overoptimization\"): gains over the SFT "
            "model against d = sqrt(KL), with their fitted forms, gain = d (a - b ln d) for the RL runs and "
            "d (a - b d) for best-of-n (least squares in a and b; R² around the mean gain, so a form that explains "
            "less than a flat line scores below 0). Gold: markers with 95% intervals, the fit solid; proxy: "
            f"crosses, the fit dashed, the reward model's score put in gold units by a line ({cal['how']}: slope "
            f"{cal['slope']:.3g}"
            + (f"; the proxy's Pearson correlation with the gold there r = {cal['r']:.2f}; not the least-squares "
               "slope, which is |r| times smaller and would shrink the proxy's gains" if cal.get("r") is not None
               else "") + ") so the two can be compared. Right: the PPO runs per iteration on their training "
            "rollouts.", "",
            _md_table(["run", "score", "form", "a", "b", "R²", "RMSE", "points"], _fit_rows(analysis)), "",
        ]
    return out + lines


def _fit_rows(analysis: dict[str, Any]) -> list[list[str]]:
    body = []
    for run, fits in analysis["runs"].items():
        form = "best-of-n" if run == "bon" else "RL"
        for what in ("gold", "proxy"):
            fit = fits[f"fit_{what}"]
            if "error" in fit:
                body.append([LABELS[run], what, form, "-", "-", "-", "-", f"no fit: {fit['error']}"])
            else:
                body.append([LABELS[run], what, form, f"{fit['a']:.3g}", f"{fit['b']:.3g}", _fmt(fit["r2"], 2),
                             f"{fit['rmse']:.3g}", str(fit["n"])])
    return body


def _fall_sentence(lab: Lab, analysis: dict[str, Any]) -> str:
    """Whether the unpenalized run's held-out gold fell after its peak by more than the combined interval of the
    peak and the later point while the proxy rose, with the numbers of the test."""
    run = analysis["runs"].get("ppo_nokl")
    if not run:
        return ""
    onset, points = analysis["onset"], run["points"]
    test = ("by more than the combined 95% interval of the two points, sqrt(ci_peak² + ci_later²) (conservative: "
            "both answer the same prompts, so a paired interval would be narrower)")
    if onset:
        return (f"Without the KL penalty the gold turns: it peaks at "
                f"{_pm(onset['peak_gold'], onset['peak_gold_ci95'])} at KL {onset['peak_kl']:.1f} nats, then falls "
                f"to {_pm(onset['gold'], onset['gold_ci95'])} at KL {onset['kl']:.1f}, a drop of {onset['drop']:.3f}, "
                f"more than the combined 95% interval of the two points, {onset['combined_ci95']:.3f} = sqrt(ci_peak² "
                "+ ci_later²) (conservative: both answer the same prompts, so a paired interval would be narrower), "
                "while the proxy still rises, "
                f"{onset['peak_proxy']:.3f} -> {onset['proxy']:.3f}: the policy is exploiting the reward model where "
                "it is wrong.")
    peak = max(points, key=lambda p: p["gold"])
    end, hacked = points[-1], lab.results.get("eval_ppo_nokl", {})
    sft = lab.results["eval_sft"]
    return (f"Without the KL penalty no held-out point after the gold's peak ({_pm(peak['gold'], peak['gold_ci95'])} "
            f"at KL {peak['kl']:.1f} nats) falls below it {test} while the proxy still rises: this run does not show "
            f"the fall (it ends at gold {_pm(end['gold'], end['gold_ci95'])} at KL {end['kl']:.1f}, proxy "
            f"{points[0]['proxy']:.3f} -> {end['proxy']:.3f})."
            + (f" Its final answers: fluency NLL {hacked['fluency_nll']:.2f} (SFT {sft['fluency_nll']:.2f}), "
               f"distinct-2 {hacked['distinct_2']:.2f} (SFT {sft['distinct_2']:.2f})."
               if "fluency_nll" in hacked else ""))


def _kl_sentence(analysis: dict[str, Any]) -> str:
    """Whether the penalized PPO run ends at no more than half the unpenalized run's KL (end against end), and the
    unpenalized run's KL after as many optimizer steps as the penalized run took, where it has that checkpoint."""
    held, free = analysis["penalized_kl"], analysis["unpenalized_kl"]
    if analysis["penalty_halves_kl"] is None:
        return ""
    halves = analysis["penalty_halves_kl"]
    ratio = f" ({held / free:.0%} of it)" if free > 0 else ""
    steps, same = analysis.get("penalized_steps"), analysis.get("unpenalized_kl_at_penalized_steps")
    # runs of different lengths: at the same optimizer steps the comparison is like with like
    matched = (f" The unpenalized run is longer ({analysis['unpenalized_steps']} optimizer steps); after the "
               f"penalized run's {steps} it was at KL {same:.1f}"
               + (f", so the penalized run ends at {held / same:.0%} of that." if same > 0 else ".")
               if same is not None and analysis.get("unpenalized_steps") != steps else "")
    return (f"The KL penalty {'holds' if halves else 'does not hold'} the policy: PPO (KL) ends at KL {held:.1f} "
            f"nats, {'no more than' if halves else 'more than'} half of PPO at beta = 0's {free:.1f} at its end"
            f"{ratio}.{matched}")


def _simpo_sentence(lab: Lab, analysis: dict[str, Any]) -> str:
    """SimPO past the KL target: the reference-free method's known cost, and the attempt to tame it that the
    lab's docs record (measured, not assumed)."""
    if not analysis["simpo_over_target"]:
        return ""
    return (f"SimPO ends at KL {analysis['simpo_kl']:.1f} nats, above the {analysis['target_kl']:g}-nat target, so "
            "it misses: the drift is the reference-free method's known cost. Its loss compares the answers' "
            "length-normalised log-probabilities with no reference model, so nothing holds it near the SFT model "
            "(DPO and IPO measure their margins against it). SimPO keeps its defaults here and the report shows the "
            "miss: in a measured attempt (docs/lab.md) a lower learning rate held its KL under 10 nats but lost the "
            "gold and still cost 1.3 nats/token of fluency.")


def _along_training(lab: Lab, rows: list[dict]) -> list[str]:
    """A table of the held-out evaluations along training: gold at KL (fluency) per checkpoint."""
    body = []
    for r in rows:
        curve = held_out_curve(lab, r["method"])
        if curve:
            body.append([LABELS[r["method"]], "; ".join(
                f"{c['step']}: {_fmt(c['gold'])} at {_fmt(c['kl'], 2)} ({_fmt(c['fluency_nll'], 2)})" for c in curve)])
    if not body:
        return []
    return ["Along training, held out (optimizer steps done: gold at KL nats (fluency NLL/token)):", "",
            _md_table(["method", "checkpoints, then the end"], body), ""]


def _rs_by_round(lab: Lab) -> str:
    """What each rejection-sampling round drew: the reward model's mean score of all samples and of the kept ones
    (a later round samples from the model the earlier one fine-tuned)."""
    rounds = lab.results.get("rs", {}).get("rounds") or []
    if not rounds:
        return ""
    by_round = {key: ", ".join(f"{r[key]:.2f}" for r in rounds) for key in ("mean_score", "mean_kept_score")}
    return (f"; the reward model's mean score of the samples by round {by_round['mean_score']}, of the kept ones "
            f"{by_round['mean_kept_score']}")


def _html(md: str, root: Path) -> str:
    """A self-contained HTML rendering of the report's markdown subset (headings, tables, lists, images)."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>alignlab report</title><style>"
           "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
           "th{background:#f3f3f3}img{max-width:100%}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    in_list = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
                i += 1
            out.append("</table>")
            continue
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            i += 1
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("![") and "](" in line:
            src = line.split("](", 1)[1].rstrip(")")
            data = base64.b64encode((root / src).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(src)}' src='data:image/png;base64,{data}'></p>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    if in_list:
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str) -> str:
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", text)
