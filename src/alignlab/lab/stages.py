"""The lab's stages: each composes a trainer or an evaluation and returns a JSON-able result.

Stages never parse files the trainers own beyond their documented outputs (``final/``, ``metrics.jsonl``,
``samples.jsonl``, ``eval_stats.json``); every number in the report comes from these results.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab.config import LabConfig
from alignlab.data.io import write_jsonl
from alignlab.evaluate import evaluate_samples, spearman
from alignlab.generation import Sample, SamplingConfig, generate_from_ids
from alignlab.lab.annotate import annotate
from alignlab.lab.cache import Lab
from alignlab.models import load_model, load_tokenizer, resolve_precision
from alignlab.tasks import Task

# what a point along training records (the final model's evaluation holds these and more)
POINT_KEYS = ("gold", "gold_ci95", "vader", "proxy", "proxy_ci95", "kl", "kl_ci95", "fluency_nll", "distinct_2",
              "win_rate")


def eval_autocast() -> torch.autocast:
    """The evaluations' KL and fluency log-probs under bf16 autocast where the CPU has it: faster than
    float32, and on a demo run's held-out samples the KL and fluency moved by far less than their intervals
    (docs/lab.md)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision("auto") == "bf16")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Context:
    """What every stage needs: the config, the task, the lab (for earlier results) and the prompts."""

    cfg: LabConfig
    task: Task
    lab: Lab
    train_prompts: list[str]
    eval_prompts: list[str]

    # -- helpers ---------------------------------------------------------------------------------------

    def result(self, stage: str) -> dict[str, Any]:
        return self.lab.results[stage]

    @property
    def sft_model(self) -> str:
        return self.result("sft")["model"]

    @property
    def rm_path(self) -> str:
        return self.result("reward_model")["model"]

    @property
    def method_reward(self) -> str:
        """What the reward-driven methods (PPO, GRPO, RLOO, rejection sampling, best-of-n) optimise: the task's
        verifiable reward (``module:function``) when it has one, else the reward model learned from the rankings."""
        fn = self.task.reward
        return f"{fn.__module__}:{fn.__qualname__}" if fn is not None else self.rm_path

    def reward_options(self) -> dict[str, Any]:
        """A trainer's reward options for :attr:`method_reward`."""
        return {"reward": self.method_reward} if self.task.reward is not None else {"reward_model": self.rm_path}

    def sampling(self, seed: int) -> SamplingConfig:
        # temperature 1: samples from the policy itself, so the KL estimate is unbiased
        return SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0, top_p=1.0,
                              batch_size=self.cfg.gen_batch_size, seed=seed, precision=resolve_precision("auto"))

    def sample(self, model: str | torch.nn.Module, prompts: list[str], n: int, seed: int) -> list[list[Sample]]:
        """n samples per prompt (prompts already rendered as text) from a model folder or a loaded model (left as
        it is: where the CPU has bf16, a bf16 copy samples)."""
        from alignlab.data.tokenize import encode_prompt

        tokenizer = load_tokenizer(model if isinstance(model, str) else self.sft_model)  # a trained one: SFT's
        sampling = self.sampling(seed)
        if sampling.precision == "bf16":  # a model loaded only to sample: bf16 weights, no per-step autocast casts
            sampling.precision = "fp32"
            model = (load_model(model, dtype=torch.bfloat16) if isinstance(model, str)
                     else copy.deepcopy(model).to(torch.bfloat16))
        elif isinstance(model, str):
            model = load_model(model)
        ids = [encode_prompt(tokenizer, p, template="none") for p in prompts]
        flat = generate_from_ids(model, tokenizer, [i for i in ids for _ in range(n)], sampling)
        return [flat[j * n : (j + 1) * n] for j in range(len(prompts))]

    def prompts_file(self, folder: Path) -> str:
        return str(write_jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in self.train_prompts]))

    def train_common(self, folder: Path) -> dict[str, Any]:
        return dict(output_dir=str(folder / "run"), seed=self.cfg.seed, lora=self.cfg.lora, lora_r=16,
                    lora_alpha=32, batch_size=self.cfg.batch_size, progress=self.cfg.progress, warmup_ratio=0.0,
                    resume="never")

    # -- SFT -------------------------------------------------------------------------------------------

    def sft(self, folder: Path) -> dict[str, Any]:
        from alignlab.config import SFTConfig
        from alignlab.train.sft import train_sft

        demos = folder / "demonstrations.json"
        demos.write_text(json.dumps(self.task.demonstrations, indent=1))
        cfg = SFTConfig(model=self.cfg.model, data=str(demos), template="alpaca", max_steps=self.cfg.sft_steps,
                        lr=self.cfg.sft_lr, eval_fraction=0.1, max_length=256,
                        **self.train_common(folder))
        run = train_sft(cfg)
        metrics = _read_jsonl(run / "metrics.jsonl")
        return {"model": str(run / "final"), "optimizer_steps": len(metrics), "examples": len(self.task.demonstrations),
                "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
                "eval_loss": metrics[-1].get("eval_loss"), "curve": [m["loss"] for m in metrics]}

    # -- preference data -------------------------------------------------------------------------------

    def preferences(self, folder: Path) -> dict[str, Any]:
        k = self.cfg.k_annotate
        groups = self.sample(self.sft_model, self.train_prompts, k, seed=self.cfg.seed + 1)
        texts = [[s.text for s in g] for g in groups]
        gold = [self.task.gold_score([p] * len(t), t) for p, t in zip(self.train_prompts, texts)]
        unfinished = [[not s.finished for s in g] for g in groups]
        records, report = annotate(self.train_prompts, texts, gold, temperature=self.cfg.annotator_temperature,
                                   seed=self.cfg.seed, unfinished=unfinished)
        path = write_jsonl(folder / "preferences.jsonl",
                            [{"prompt": r.prompt, "responses": r.responses, "unfinished": r.unfinished}
                             for r in records])
        flat_gold = [g for row in gold for g in row]
        return {"file": str(path), "samples": len(flat_gold), "rankings": len(records),
                "unfinished": sum(map(sum, unfinished)),
                "pairs": sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in records),
                "sample_gold_mean": sum(flat_gold) / len(flat_gold), **report}

    # -- reward model ----------------------------------------------------------------------------------

    def reward_model(self, folder: Path) -> dict[str, Any]:
        from alignlab.config import RewardConfig
        from alignlab.train.reward_model import train_reward

        cfg = RewardConfig(model=self.sft_model, data=self.result("preferences")["file"], format="ranking",
                           template="none", max_steps=self.cfg.rm_steps, lr=self.cfg.rm_lr, eval_fraction=0.2,
                           max_length=256, **{**self.train_common(folder), "batch_size": self.cfg.rm_batch_size})
        run = train_reward(cfg)
        stats_file = run / "eval_stats.json"
        evals = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return {"model": str(run / "final"), "optimizer_steps": self.cfg.rm_steps,
                "eval": {k: v for k, v in evals.items() if isinstance(v, (int, float))}}

    # -- evaluation ------------------------------------------------------------------------------------

    def held_out_samples(self, model: str | torch.nn.Module, answers: int | None = None) -> list[Sample]:
        """``answers`` (default ``eval_answers``) answers per held-out prompt, prompt by prompt
        (:meth:`eval_prompt_index`), with the seed every evaluation uses: each model answers the same prompts with
        the same random stream, so the comparison with SFT is paired by prompt."""
        groups = self.sample(model, self.eval_prompts, answers or self.cfg.eval_answers, seed=self.cfg.seed + 7)
        return [s for g in groups for s in g]

    def eval_prompt_index(self, answers: int | None = None) -> list[int]:
        """Which held-out prompt each evaluated answer answers: 0, 0, .., 1, 1, .. (``answers`` each)."""
        return [j for j in range(len(self.eval_prompts)) for _ in range(answers or self.cfg.eval_answers)]

    def eval_prompts_per_answer(self, answers: int | None = None) -> list[str]:
        return [self.eval_prompts[j] for j in self.eval_prompt_index(answers)]

    def judges(self) -> tuple[torch.nn.Module, Any, int]:
        """What every evaluation measures with, loaded once per stage: the SFT model (the reference of KL and
        fluency), the reward model (the proxy score) and the pad id."""
        from alignlab.scoring import load_scorer

        return (load_model(self.sft_model), load_scorer(self.rm_path, precision="auto"),
                load_tokenizer(self.sft_model).pad_token_id)

    def _measure(self, samples: list[Sample], policy: torch.nn.Module | None, baseline: dict[str, Any] | None,
                 judges: tuple[torch.nn.Module, Any, int], answers: int | None = None) -> dict[str, Any]:
        """Evaluate held-out answers (``answers``, default ``eval_answers``, per prompt, in prompt order);
        ``baseline`` is SFT's evaluation (its per-answer ``gold_scores`` and ``prompt_index``: the win rate and
        gap closed)."""
        reference, proxy, pad = judges
        with eval_autocast():
            return evaluate_samples(samples, self.eval_prompts_per_answer(answers), gold_score=self.task.gold_score,
                                    prompt_index=self.eval_prompt_index(answers), reports=self.task.reports,
                                    policy=policy,
                                    reference=reference, pad_token_id=pad, proxy_scorer=proxy,
                                    baseline_gold=baseline["gold_scores"] if baseline else None,
                                    baseline_index=baseline["prompt_index"] if baseline else None)

    def _evaluate(self, folder: Path, samples: list[Sample], policy_path: str | None,
                  baseline: dict[str, Any] | None, extra: dict[str, Any] | None = None,
                  judges: tuple[torch.nn.Module, Any, int] | None = None) -> dict[str, Any]:
        policy = load_model(policy_path) if policy_path else None
        result = self._measure(samples, policy, baseline, judges or self.judges())
        result.update(extra or {})
        write_jsonl(folder / "samples.jsonl", [
            {"prompt": p, "prompt_index": j, "response": s.text, "gold": g} for p, j, s, g in
            zip(self.eval_prompts_per_answer(), self.eval_prompt_index(), samples, result["gold_scores"])])
        result["examples"] = [s.text for s in samples]
        return result

    def evaluate_sft(self, folder: Path) -> dict[str, Any]:
        result = self._evaluate(folder, self.held_out_samples(self.sft_model), self.sft_model, None)
        # how far the gold departs from the tone alone on the SFT model's answers (1 = the same order)
        for name in self.task.reports:
            result[f"gold_{name}_spearman"] = spearman(result["gold_scores"], result[f"{name}_scores"])
        base = self.held_out_samples(self.cfg.model, answers=1)  # the base model's gold is context: one answer each
        base_gold = self.task.gold_score(self.eval_prompts, [s.text for s in base])
        result["base_gold"] = sum(base_gold) / len(base)
        return result

    def evaluate_method(self, method: str, stage: str | None = None) -> Callable[[Path], dict[str, Any]]:
        """The evaluation of ``method`` trained by stage ``stage`` (default: the method's name; a study names
        a method trained at another KL control e.g. ``dpo@beta=0.5``)."""
        stage = stage or method

        def run(folder: Path) -> dict[str, Any]:
            trained = self.result(stage)
            baseline = self.result("eval_sft")
            if method == "bon":
                samples = [Sample(**s) for s in trained["chosen_samples"]]
                return self._evaluate(folder, samples, None, baseline, {"kl": trained["kl_bound"],
                                                                        "kl_note": "analytic bound"})
            judges = self.judges()
            result = self._evaluate(folder, self.held_out_samples(trained["model"]), trained["model"], baseline,
                                    judges=judges)
            points = []
            for step, load in self._models_along_training(method, stage):  # measured as the final model is
                model = load()
                # points along training: curve_answers per prompt (fewer than the final model's: cheaper)
                answers = self.cfg.curve_answers
                measured = self._measure(self.held_out_samples(model, answers), model, baseline, judges, answers)
                points.append({"step": step, **{k: measured.get(k) for k in POINT_KEYS}})
            ends = {"step": trained["optimizer_steps"], **{k: result.get(k) for k in POINT_KEYS}}
            result["curve"] = [*points, ends] if points else []
            return result

        return run

    def _models_along_training(self, method: str, stage: str) -> list[tuple[int, Callable[[], torch.nn.Module]]]:
        """(optimizer steps done, a loader of the model then) for the method's checkpoints before its end:
        the trainer's checkpoints (``curve_points`` of them, saved by the method's stage), or rejection
        sampling's earlier rounds."""
        from alignlab.config import DPOConfig, PPOConfig
        from alignlab.train.checkpoints import list_checkpoints, run_config
        from alignlab.train.policy import policy_from_checkpoint

        trained, c = self.result(stage), self.cfg
        if not self.curve_points(method):
            return []
        if method == "rs":
            run = Path(trained["model"]).parents[2]  # run/round-R/sft/final
            return [(c.rs_steps * r, lambda r=r: load_model(str(run / f"round-{r}" / "sft" / "final")))
                    for r in range(1, len(trained["rounds"]))]
        run = Path(trained["model"]).parent  # run/final
        from alignlab.config import GRPOConfig

        cls, prefix, per_step = ((PPOConfig, "policy.", self.ppo_steps_per_iteration)
                                 if method in ("ppo", "ppo_nokl") else
                                 (GRPOConfig, "policy.", self.grpo_steps_per_iteration)
                                 if method in ("grpo", "rloo") else (DPOConfig, "", 1))
        cfg = run_config(run, cls)
        tokenizer = load_tokenizer(self.sft_model)
        out = []
        for checkpoint in list_checkpoints(run / "checkpoints"):
            step = int(checkpoint.name.split("-")[1]) * per_step  # PPO checkpoints count iterations
            if step < trained["optimizer_steps"]:
                out.append((step, lambda ck=checkpoint: policy_from_checkpoint(cfg, ck, tokenizer, prefix=prefix)))
        return out

    @property
    def ppo_steps_per_iteration(self) -> int:
        """PPO's optimizer steps per rollout: epochs x minibatches of ``batch_size``."""
        return self.cfg.ppo_epochs * max(1, self.cfg.ppo_rollout // self.cfg.batch_size)

    @property
    def grpo_steps_per_iteration(self) -> int:
        """GRPO's and RLOO's optimizer steps per rollout: epochs x minibatches (of ``batch_size`` responses, whole
        groups)."""
        return self.cfg.grpo_epochs * self.grpo_mini_batches

    @property
    def grpo_mini_batches(self) -> int:
        c = self.cfg
        return max(1, min(c.ppo_rollout // c.batch_size, c.ppo_rollout // c.grpo_group_size))

    def curve_points(self, method: str) -> int:
        """Checkpoints evaluated along the method's training: ``nokl_curve_points`` for the unpenalized PPO run
        (its gold's peak and fall), ``curve_points`` for the others."""
        return self.cfg.nokl_curve_points if method == "ppo_nokl" else self.cfg.curve_points

    def ppo_iterations(self, method: str) -> int:
        """PPO's iterations: ``ppo_nokl_iterations`` for the unpenalized run (long enough to overoptimize),
        ``ppo_iterations`` for the penalized one."""
        return self.cfg.ppo_nokl_iterations if method == "ppo_nokl" else self.cfg.ppo_iterations

    def checkpointing(self, total: int, points: int | None = None) -> dict[str, int]:
        """A trainer's checkpoint settings for ``points`` (default ``curve_points``) evenly spaced checkpoints
        before its end."""
        points = self.cfg.curve_points if points is None else points
        return {"save_every": math.ceil(total / (points + 1)) if points else 0, "keep_checkpoints": points + 2}

    # -- methods ---------------------------------------------------------------------------------------

    def method(self, name: str) -> Callable[[Path], dict[str, Any]]:
        return {"ppo": lambda f: self.ppo(f, "ppo"), "ppo_nokl": lambda f: self.ppo(f, "ppo_nokl"),
                "grpo": lambda f: self.grpo(f, "grpo"), "rloo": lambda f: self.grpo(f, "rloo"),
                "dpo": lambda f: self.dpo(f, "dpo"), "ipo": lambda f: self.dpo(f, "ipo"),
                "simpo": lambda f: self.dpo(f, "simpo"), "rs": self.rs, "bon": self.bon}[name]

    def ppo(self, folder: Path, method: str) -> dict[str, Any]:
        """``ppo`` (KL penalty ``ppo_kl_coef``) or ``ppo_nokl`` (beta = 0, its own iterations and checkpoints)."""
        from alignlab.config import PPOConfig
        from alignlab.train.ppo import train_ppo

        c = self.cfg
        kl_coef = c.ppo_kl_coef if method == "ppo" else 0.0
        iterations = self.ppo_iterations(method)
        cfg = PPOConfig(model=self.sft_model, prompts=self.prompts_file(folder), eval_fraction=0.0,
                        **self.reward_options(), kl_coef=kl_coef, iterations=iterations,
                        num_mini_batches=max(1, c.ppo_rollout // c.batch_size), ppo_epochs=c.ppo_epochs,
                        share_backbone=c.ppo_share_backbone, responses_per_prompt=c.ppo_responses_per_prompt,
                        max_new_tokens=c.max_new_tokens, template="none", lr=c.ppo_lr,
                        log_samples=c.ppo_rollout, generation_batch_size=c.gen_batch_size,
                        reward_normalization="none" if self.task.reward else "stats",
                        **{**self.train_common(folder), "batch_size": min(c.batch_size, c.ppo_rollout),
                           **self.checkpointing(iterations, self.curve_points(method))})
        run = train_ppo(cfg)
        return {"model": str(run / "final"), "optimizer_steps": iterations * self.ppo_steps_per_iteration,
                "samples": iterations * c.ppo_rollout,
                "curve": self.rollout_curve(run)}

    def rollout_curve(self, run: Path) -> list[dict[str, Any]]:
        """Gold along an online method's training, from the rollouts the policy actually produced (its
        ``samples.jsonl``), beside each iteration's proxy score, KL and length (and groups dropped, for GRPO)."""
        rollouts = [r for r in _read_jsonl(run / "samples.jsonl") if r.get("split") == "train"]
        curve = []
        for m in _read_jsonl(run / "metrics.jsonl"):
            rows = [r for r in rollouts if r["step"] == m["step"]]
            if "score" in m and rows:
                gold = self.task.gold_score([r["prompt"] for r in rows], [r["response"] for r in rows])
                point = {"iteration": m["step"], "gold": sum(gold) / len(gold), "proxy": m["score"],
                         "kl": m.get("kl", 0.0), "length": m.get("response_length")}
                if "dropped_groups" in m:
                    point["dropped_groups"] = m["dropped_groups"]
                curve.append(point)
        return curve

    def grpo(self, folder: Path, advantage: str) -> dict[str, Any]:
        """GRPO or RLOO (``alignlab grpo``): PPO's prompts and rollout size, ``grpo_group_size`` responses per
        prompt, no value model."""
        from alignlab.config import GRPOConfig
        from alignlab.train.grpo import train_grpo

        c = self.cfg
        cfg = GRPOConfig(model=self.sft_model, prompts=self.prompts_file(folder), eval_fraction=0.0,
                         **self.reward_options(), advantage=advantage, beta=c.grpo_beta,
                         iterations=c.grpo_iterations, group_size=c.grpo_group_size,
                         prompts_per_iteration=max(1, c.ppo_rollout // c.grpo_group_size),
                         num_mini_batches=self.grpo_mini_batches, update_epochs=c.grpo_epochs,
                         max_new_tokens=c.max_new_tokens, template="none", lr=c.grpo_lr,
                         log_samples=c.ppo_rollout, generation_batch_size=c.gen_batch_size,
                         **{**self.train_common(folder), "batch_size": min(c.batch_size, c.ppo_rollout),
                            **self.checkpointing(c.grpo_iterations)})
        run = train_grpo(cfg)
        dropped = sum(m.get("dropped_groups", 0) for m in _read_jsonl(run / "metrics.jsonl") if "score" in m)
        return {"model": str(run / "final"), "optimizer_steps": c.grpo_iterations * self.grpo_steps_per_iteration,
                "samples": c.grpo_iterations * cfg.prompts_per_iteration * c.grpo_group_size,
                "dropped_groups": dropped, "curve": self.rollout_curve(run)}

    def dpo(self, folder: Path, loss: str) -> dict[str, Any]:
        from alignlab.config import DPOConfig
        from alignlab.train.dpo import train_dpo

        c = self.cfg
        beta = {"dpo": c.dpo_beta, "ipo": c.ipo_beta}.get(loss, 0.0)  # 0 = the loss's own default (SimPO: 2.0)
        # DPO and IPO score the same responses with the same reference (the SFT model): its log-probs are
        # computed once, by whichever runs first, and read from the run's cache by the other
        cfg = DPOConfig(model=self.sft_model, data=self.result("preferences")["file"], format="ranking",
                        template="none", loss=loss, beta=beta, max_steps=c.dpo_steps, lr=c.dpo_lr, max_length=256,
                        eval_fraction=0.0, precompute_ref=loss != "simpo",
                        ref_cache_dir=str(self.lab.root / "reference-logps"),
                        **{**self.train_common(folder), "batch_size": c.dpo_batch_size,
                           **self.checkpointing(c.dpo_steps)})
        run = train_dpo(cfg)
        metrics = _read_jsonl(run / "metrics.jsonl")
        return {"model": str(run / "final"), "optimizer_steps": len(metrics),
                "samples": self.result("preferences")["samples"],
                "curve": [{"step": m["step"], "loss": m.get("loss"), "margin": m.get("rewards/margins"),
                           "accuracy": m.get("rewards/accuracies")} for m in metrics]}

    def rs(self, folder: Path) -> dict[str, Any]:
        from alignlab.config import RSConfig
        from alignlab.train.rejection import run_rs

        c = self.cfg
        cfg = RSConfig(model=self.sft_model, prompts=self.prompts_file(folder), **self.reward_options(),
                       n=c.rs_n, rounds=c.rs_rounds, template="none", temperature=1.0, max_new_tokens=c.max_new_tokens,
                       gen_batch_size=c.gen_batch_size, max_steps=c.rs_steps, lr=c.rs_lr, eval_fraction=0.0,
                       max_length=256, **{**self.train_common(folder), "output_dir": str(folder / "run")})
        final = run_rs(cfg)
        rounds = json.loads((folder / "run" / "rounds.json").read_text())
        return {"model": str(final), "optimizer_steps": c.rs_steps * len(rounds),
                "samples": sum(r["samples"] for r in rounds), "rounds": rounds}

    def bon(self, folder: Path) -> dict[str, Any]:
        from alignlab.scoring import load_scorer
        from alignlab.train.rejection import best_of_n_kl, curve_ks

        n, answers = self.cfg.bon_n, self.cfg.eval_answers
        # n x eval_answers samples per prompt, cut into eval_answers groups of n: best-of-n then has as many
        # answers per prompt as every other method's evaluation (one sampling call, one scoring call)
        per_prompt = self.sample(self.sft_model, self.eval_prompts, n * answers, seed=self.cfg.seed + 11)
        groups = [g[a * n : (a + 1) * n] for g in per_prompt for a in range(answers)]  # prompt by prompt
        prompts = [p for p in self.eval_prompts_per_answer() for _ in range(n)]
        texts = [s.text for g in groups for s in g]
        scorer = load_scorer(self.method_reward, precision="auto")
        proxy_flat, gold_flat = scorer.score(prompts, texts), self.task.gold_score(prompts, texts)
        proxy = [proxy_flat[i * n : (i + 1) * n] for i in range(len(groups))]
        gold = [gold_flat[i * n : (i + 1) * n] for i in range(len(groups))]
        curve = []
        for k in curve_ks(n):  # ends at k = n: its picks are the answers evaluated
            picks = [max(range(k), key=lambda i, s=s: (s[i], -i)) for s in proxy]
            curve.append({"n": k, "kl": best_of_n_kl(k),
                          "gold": sum(g[i] for g, i in zip(gold, picks)) / len(picks),
                          "proxy": sum(s[i] for s, i in zip(proxy, picks)) / len(picks)})
        chosen = [groups[j][i] for j, i in enumerate(picks)]
        return {"n": n, "kl_bound": best_of_n_kl(n), "samples": len(texts), "optimizer_steps": 0,
                "curve": curve, "chosen_samples": [s.__dict__ for s in chosen]}
