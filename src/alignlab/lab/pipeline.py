"""The lab: the whole pipeline on one task, every method on the same data and budget, then one report.

    base model -> SFT (task demonstrations, Alpaca template)
               -> preference data (K samples per train prompt from the SFT model, ranked by simulated
                  annotators who see the gold score through Plackett-Luce noise)
               -> reward model (K-wise loss on those rankings)
               -> methods, each starting from the SFT model:
                    ppo (KL penalty), ppo_nokl (beta = 0, longer: ppo_nokl_iterations, evaluated at
                    nokl_curve_points checkpoints, to show overoptimization), grpo and rloo (critic-free),
                    dpo, ipo, simpo (the preference pairs),
                    rs (rejection sampling with the reward model, in rounds), bon (best-of-n at inference)
               -> evaluation on held-out prompts -> report (markdown + self-contained html + plots; reward
                  hacking drawn as Gao et al. 2022 by lab/overoptimization.py)

A task with a verifiable reward (``Task.reward``, e.g. arithmetic: the answer is checked) runs by default
ppo, grpo, rloo, rs and bon, and those methods optimise the checked reward itself rather than the reward model
(which is still trained from the annotators' rankings, for the DPO family and the proxy column).

Every stage is cached by its inputs: its folder holds ``stage.json`` with a key (a hash of the stage's
parameters and the keys of the stages it reads); a rerun reuses a stage whose key matches and recomputes it
(and what depends on it) when anything changed. Within a method, time and peak memory are measured around
the training stage (peak RSS is reset before each stage through ``/proc/self/clear_refs``).

All prompts are rendered once with the Alpaca template, and every trainer reads them as plain text
(template ``none``), so every method sees exactly the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignlab.config import ALL_METHODS, CHECKPOINTING_METHODS, PAIRWISE_METHODS, VERIFIABLE_METHODS, LabConfig
from alignlab.data.templates import render_alpaca_prompt
from alignlab.errors import AlignlabError
from alignlab.lab import stages
from alignlab.lab.cache import Lab
from alignlab.lab.report import write_report
from alignlab.tasks import load_task


def run_lab(cfg: LabConfig) -> Path:
    """Run (or reuse) every stage and write the report; returns the report's path."""
    ctx = open_lab(cfg)
    run_shared_stages(ctx)
    for method in ctx.cfg.methods:
        run_method(ctx, method)
    report = write_report(ctx.lab, ctx.task)
    print(f"[lab] report: {report} (and {report.with_suffix('.html')})")
    return report


def open_lab(cfg: LabConfig) -> stages.Context:
    """Check ``cfg`` against its task, open its lab folder and render the prompts: the context every stage runs
    in. Nothing is trained here."""
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise AlignlabError(f"unknown methods {unknown} (choose from {', '.join(ALL_METHODS)})", field="methods")
    task = load_task(cfg.task, prompts_file=cfg.prompts or None, n_eval=cfg.n_eval, seed=cfg.seed)
    if task.reward is not None and cfg.methods == ALL_METHODS:  # a checked reward: the RL methods and the samplers
        cfg.methods = list(VERIFIABLE_METHODS)
    for points in ("curve_points", "nokl_curve_points"):
        if getattr(cfg, points) < 0:
            raise AlignlabError(f"{points} must be >= 0, got {getattr(cfg, points)}", field=points)
    if len(task.train_prompts) < cfg.n_train:
        raise AlignlabError(f"the task has {len(task.train_prompts)} training prompts, fewer than n_train="
                            f"{cfg.n_train}", field="n_train")
    lab = Lab(cfg)
    (lab.root / "lab_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    train_prompts = [render_alpaca_prompt(task.instruction, p) for p in task.train_prompts[: cfg.n_train]]
    eval_prompts = [render_alpaca_prompt(task.instruction, p) for p in task.eval_prompts]
    return stages.Context(cfg=cfg, task=task, lab=lab, train_prompts=train_prompts, eval_prompts=eval_prompts)


def common_params(ctx: stages.Context) -> dict[str, Any]:
    """The parameters every stage's key holds: what the task, its gold, the model and the sampling depend on (a
    new gold re-ranks the preference data)."""
    cfg = ctx.cfg
    return {"model": cfg.model, "task": cfg.task, "prompts": cfg.prompts, "seed": cfg.seed,
            "n_train": cfg.n_train, "n_eval": cfg.n_eval, "lora": cfg.lora, "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size, "gold": ctx.task.gold_formula}


def run_shared_stages(ctx: stages.Context) -> None:
    """The stages every method starts from: SFT, the preference data, the reward model, SFT's evaluation."""
    cfg, lab, common = ctx.cfg, ctx.lab, common_params(ctx)
    lab.stage("sft", {**common, "steps": cfg.sft_steps, "lr": cfg.sft_lr}, [], ctx.sft)
    # "unfinished": the file marks answers cut at max_new_tokens (trained without EOS); older runs lack the flags
    lab.stage("preferences", {**common, "k": cfg.k_annotate, "temperature": cfg.annotator_temperature,
                              "unfinished": True}, ["sft"], ctx.preferences)
    lab.stage("reward_model", {**common, "steps": cfg.rm_steps, "lr": cfg.rm_lr}, ["preferences"],
              ctx.reward_model)
    lab.stage("eval_sft", {**common, "eval_answers": cfg.eval_answers}, ["sft", "reward_model"], ctx.evaluate_sft)


def method_params(cfg: LabConfig, method: str) -> dict[str, Any]:
    """The parameters of ``method``'s training stage (besides :func:`common_params`): its budget and its KL
    control, so a changed beta is another stage."""
    ppo_params = {"iterations": cfg.ppo_iterations, "rollout": cfg.ppo_rollout, "lr": cfg.ppo_lr,
                  "epochs": cfg.ppo_epochs, "share_backbone": cfg.ppo_share_backbone,
                  "responses_per_prompt": cfg.ppo_responses_per_prompt}
    grpo_params = {"iterations": cfg.grpo_iterations, "rollout": cfg.ppo_rollout, "lr": cfg.grpo_lr,
                   "epochs": cfg.grpo_epochs, "group_size": cfg.grpo_group_size, "beta": cfg.grpo_beta}
    return {
        "ppo": {**ppo_params, "kl_coef": cfg.ppo_kl_coef},
        # beta = 0 runs longer: the penalized run levels off, the unpenalized one needs the length to overoptimize
        "ppo_nokl": {**ppo_params, "iterations": cfg.ppo_nokl_iterations, "kl_coef": 0.0},
        "grpo": {**grpo_params, "advantage": "grpo"},
        "rloo": {**grpo_params, "advantage": "rloo"},
        "dpo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "beta": cfg.dpo_beta,
                "rankings_per_step": cfg.dpo_batch_size},
        "ipo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "beta": cfg.ipo_beta,
                "rankings_per_step": cfg.dpo_batch_size},
        "simpo": {"steps": cfg.dpo_steps, "lr": cfg.dpo_lr, "rankings_per_step": cfg.dpo_batch_size},
        "rs": {"rounds": cfg.rs_rounds, "n": cfg.rs_n, "steps": cfg.rs_steps, "lr": cfg.rs_lr},
        "bon": {"n": cfg.bon_n, "eval_answers": cfg.eval_answers},
    }[method]


def run_method(ctx: stages.Context, method: str, stage: str | None = None) -> dict[str, Any]:
    """Train ``method`` from the SFT model and evaluate it: stages ``STAGE`` and ``eval_STAGE`` (``STAGE`` =
    ``stage`` or the method's name), with the budget and KL control of ``ctx.cfg``; returns the evaluation."""
    cfg, task, stage = ctx.cfg, ctx.task, stage or method
    params = {**common_params(ctx), **method_params(cfg, method)}
    if task.reward is not None and method not in PAIRWISE_METHODS:
        params["reward"] = "verifiable"  # trained on the task's checked reward, not the reward model
    if method in CHECKPOINTING_METHODS:  # the trainer keeps the checkpoints the evaluation along training reads
        params["curve_points"] = ctx.curve_points(method)
    # the DPO family learns from the pairs alone; the others need the reward model (which needs the pairs)
    needs = ["sft", "preferences"] if method in PAIRWISE_METHODS else ["sft", "reward_model"]
    ctx.lab.stage(stage, params, needs, ctx.method(method))
    eval_params = ({**params, "curve_points": ctx.curve_points(method), "curve_answers": cfg.curve_answers}
                   if method != "bon" else params)
    return ctx.lab.stage(f"eval_{stage}", eval_params, [stage, "eval_sft"], ctx.evaluate_method(method, stage))
