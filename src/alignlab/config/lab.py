"""The lab's and the study's configs: the methods a lab compares, :class:`LabConfig` and its ``--quick`` budgets,
and the study (``alignlab lab study``): its KL sweeps and :data:`StudyConfig`, every lab option plus the study's."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple, get_args, get_origin

from alignlab.config.options import Checked, _hints, check_value, opt
from alignlab.errors import AlignlabError

__all__ = [
    "ALL_METHODS",
    "CHECKPOINTING_METHODS",
    "GROUP_METHODS",
    "MODELS_IN_MEMORY",
    "PAIRWISE_METHODS",
    "STUDY_OWN_FIELDS",
    "STUDY_SWEEPS",
    "VERIFIABLE_METHODS",
    "LabConfig",
    "StudyConfig",
    "Sweep",
    "check_study_lists",
    "copy_value",
    "quick_config",
    "quick_study_config",
]


ALL_METHODS = ["ppo", "ppo_nokl", "grpo", "rloo", "dpo", "ipo", "simpo", "rs", "bon"]
PAIRWISE_METHODS = ("dpo", "ipo", "simpo")  # learn from the preference pairs directly, no reward model
GROUP_METHODS = ("grpo", "rloo")  # critic-free online RL (alignlab grpo): group baselines, no value model
CHECKPOINTING_METHODS = ("ppo", "ppo_nokl", *GROUP_METHODS, *PAIRWISE_METHODS)  # evaluated along training
VERIFIABLE_METHODS = ["ppo", "grpo", "rloo", "rs", "bon"]  # the default methods on a task with a checked reward
MODELS_IN_MEMORY = {  # what each method holds while training (with LoRA the reference is the adapter-off policy)
    "sft": "1 (policy)",
    "ppo": "4 roles: policy, reference, reward, value (reference = policy without adapter with LoRA; value = a "
           "head on the policy with ppo_share_backbone), and a bf16 copy of the policy for sampling",
    "ppo_nokl": "4 roles, as ppo (the reference is not needed at beta = 0; kept for logging the KL)",
    "grpo": "2 or 3: policy, reward (no value model; the reference only at grpo_beta > 0, the adapter-off policy "
            "with LoRA), and a bf16 copy of the policy for sampling",
    "rloo": "2 or 3: policy, reward (no value model; the reference only at grpo_beta > 0), and a bf16 copy of the "
            "policy for sampling",
    "dpo": "2: policy, reference (adapter-off policy with LoRA)",
    "ipo": "2: policy, reference (adapter-off policy with LoRA)",
    "simpo": "1: policy (reference-free)",
    "rs": "2: policy, reward model (and a bf16 copy of the policy for sampling)",
    "bon": "2 at inference: policy, reward model",
}


@dataclass
class LabConfig(Checked):
    """One lab run: a task, a base model, the methods and their budgets."""

    name: str = opt("demo", "run name: the report goes to OUTPUT_ROOT/NAME/report.md")
    output_root: str = opt("runs", "folder holding lab runs")
    task: str = opt("sentiment", "task: a built-in name or module:function returning a Task")
    prompts: str = opt("", "replace the task's prompts with this file (e.g. IMDb review prefixes)")
    model: str = opt("smollm2-135m-instruct", "base model")
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS),
                               metadata={"help": f"methods to compare (comma list of {', '.join(ALL_METHODS)}); on a "
                                       "task with a verifiable reward (arithmetic) the default is "
                                       f"{', '.join(VERIFIABLE_METHODS)}"})
    seed: int = opt(0, "one seed for everything")
    n_eval: int = opt(64, "held-out prompts for evaluation", ge=1)
    eval_answers: int = opt(4, "answers sampled per held-out prompt (temperature 1): intervals treat the prompt as "
                            "the unit, so more answers narrow them by averaging out sampling noise", ge=1)
    curve_answers: int = opt(2, "answers per held-out prompt for the checkpoints along training (curve_points): "
                             "fewer than the final models' eval_answers, as these points cost an evaluation each",
                             ge=1)
    n_train: int = opt(48, "training prompts used by every method", ge=1)
    lora: bool = opt(True, "train LoRA adapters (r=16) instead of all weights")
    max_new_tokens: int = opt(32, "response length for sampling (annotation, PPO, RS, BoN, evaluation)", ge=1)
    gen_batch_size: int = opt(144, "sequences generated together (PPO: at most its rollout); larger batches decode "
                              "more tokens per pass over the weights (measured in BENCHMARKS.md)",
                              ge=1)
    # SFT
    sft_steps: int = opt(8, "SFT optimizer steps on the task demonstrations", ge=1)
    sft_lr: float = opt(5e-4, "SFT learning rate", gt=0)
    # preference data
    k_annotate: int = opt(6, "answers sampled per training prompt for the annotators to rank", ge=2)
    annotator_temperature: float = opt(0.1, "annotator noise: Plackett-Luce temperature on the gold score", gt=0)
    # reward model
    rm_steps: int = opt(48, "reward-model optimizer steps", ge=1)
    rm_lr: float = opt(3e-3, "reward-model learning rate", gt=0)
    rm_batch_size: int = opt(4, "rankings (prompts with all their answers) per reward-model step", ge=1)
    # DPO family
    dpo_steps: int = opt(24, "optimizer steps for dpo, ipo and simpo", ge=1)
    dpo_lr: float = opt(1e-3, "learning rate for dpo, ipo and simpo", gt=0)
    dpo_beta: float = opt(0.15, "DPO's beta", gt=0)
    ipo_beta: float = opt(0.5, "IPO's beta (tau): it pulls the log-ratio margin to 1/(2 tau), so a small tau lets it "
                          "drift far (docs/lab.md)", gt=0)
    dpo_batch_size: int = opt(3, "rankings per dpo, ipo and simpo step, each with all its pairs (15 for 6 answers, "
                              "each answer encoded once): about the sequences of 8 separate pairs", ge=1)
    # PPO
    ppo_iterations: int = opt(8, "PPO iterations (rollouts)", ge=1)
    ppo_rollout: int = opt(48, "responses per PPO rollout", ge=1)
    ppo_lr: float = opt(1e-3, "PPO learning rate", gt=0)
    ppo_kl_coef: float = opt(0.05, "KL penalty coefficient of the 'ppo' method (ppo_nokl uses 0)", ge=0)
    ppo_nokl_iterations: int = opt(24, "iterations of 'ppo_nokl' (PPO at beta = 0): 3x ppo_iterations, because the "
                                   "penalized run levels off (11-13 nats in the demo) while the unpenalized one "
                                   "needs the length to show the gold's fall while the proxy still rises "
                                   "(reward hacking; at 24 it drifted to 59 nats)", ge=1)
    ppo_epochs: int = opt(2, "PPO passes over each rollout", ge=1)
    ppo_responses_per_prompt: int = opt(4, "PPO responses per prompt in a rollout (each prompt encoded once for "
                                        "them)", ge=1)
    ppo_share_backbone: bool = opt(True, "PPO value head on the policy's backbone instead of a separate value "
                                   "model (about half the update's compute)")
    # GRPO / RLOO (critic-free; the same rollout size and prompts as PPO)
    grpo_iterations: int = opt(8, "GRPO and RLOO iterations (rollouts of ppo_rollout responses), >= 1")
    grpo_group_size: int = opt(4, "GRPO and RLOO responses per prompt (the group that is the baseline), >= 2")
    grpo_lr: float = opt(1e-3, "GRPO and RLOO learning rate, > 0")
    grpo_beta: float = opt(0.05, "GRPO and RLOO KL coefficient (GRPO: k3 in the loss; RLOO: k1 in the reward), >= 0; "
                           "0 = no reference in memory")
    grpo_epochs: int = opt(2, "GRPO and RLOO passes over each rollout (the ratio clipped after the first), >= 1")
    # rejection sampling / best-of-n
    rs_rounds: int = opt(2, "rejection-sampling rounds: sample from the current policy, keep the best, fine-tune "
                            "(the next round samples from the fine-tuned model)", ge=1)
    rs_n: int = opt(6, "samples per prompt in each rejection-sampling round", ge=1)
    rs_steps: int = opt(8, "SFT steps on each round's kept samples", ge=1)
    rs_lr: float = opt(2e-3, "rejection-sampling fine-tuning learning rate", gt=0)
    bon_n: int = opt(8, "largest n of best-of-n (the curve covers 1, 2, 4, ... n)", ge=1)
    batch_size: int = opt(16, "training micro-batch size for every method", ge=1)
    curve_points: int = opt(2, "checkpoints along each method's training (evenly spaced, besides its end) evaluated "
                            "on the held-out prompts like the final models: the frontier plot's lines "
                            "(rejection sampling: the ends of its rounds); 0 = final models only", ge=0)
    nokl_curve_points: int = opt(5, "checkpoints along ppo_nokl's training evaluated on the held-out prompts (in "
                                 "place of curve_points): enough to see the gold's peak and its fall with their "
                                 "intervals (the overoptimization plot); 0 = final model only", ge=0)
    progress: bool = opt(True, "show progress bars")


def quick_config(**overrides: Any) -> LabConfig:
    """The ``--quick`` lab: the tiny model and small budgets (about a minute; used in the test suite)."""
    base = dict(name="quick", model="tiny-random", n_eval=8, eval_answers=2, curve_answers=1, n_train=8,
                max_new_tokens=8, sft_steps=3,
                sft_lr=3e-3, k_annotate=3, rm_steps=3, rm_lr=3e-3, dpo_steps=2, dpo_lr=3e-3, ppo_iterations=2,
                ppo_nokl_iterations=3, ppo_rollout=8, ppo_lr=3e-3, grpo_iterations=2, grpo_lr=3e-3, rs_n=3,
                rs_steps=2, rs_lr=3e-3, bon_n=4, batch_size=8, gen_batch_size=48, lora=False)
    base.update(overrides)
    return LabConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- the study


class Sweep(NamedTuple):
    """A method's KL control in a study: the study's list option, the lab option it sets, and its name in a stage's
    name (``dpo@beta=0.5``)."""

    option: str
    lab_field: str
    label: str


STUDY_SWEEPS = {
    "ppo": Sweep("ppo_kl_coefs", "ppo_kl_coef", "kl_coef"),
    "dpo": Sweep("dpo_betas", "dpo_beta", "beta"),
    "ipo": Sweep("ipo_betas", "ipo_beta", "beta"),
    "grpo": Sweep("grpo_betas", "grpo_beta", "beta"),
    "rloo": Sweep("grpo_betas", "grpo_beta", "beta"),
    "rs": Sweep("rs_ns", "rs_n", "n"),
}  # ppo_nokl and simpo have no KL control (one run each); best-of-n's curve over n is its sweep
STUDY_OWN_FIELDS = ("name", "output_root", "seed", "methods")  # the study sets these in each seed's LabConfig


@dataclass
class _StudyOptions(Checked):
    """The study's own options; :data:`StudyConfig` adds every other :class:`LabConfig` option (each seed's lab)."""

    name: str = opt("study", "study name: the report goes to OUTPUT_ROOT/NAME/study.md, seed S's lab to "
                    "OUTPUT_ROOT/NAME/seed-S")
    output_root: str = opt("runs", "folder holding studies and lab runs")
    seeds: list[int] = opt([0, 1, 2], "seeds, one lab each (comma list of distinct integers; at least 2 for "
                           "intervals across seeds)")
    methods: list[str] = opt(["ppo", "dpo", "ipo", "rs", "bon", "grpo", "rloo"],
                             f"methods to compare (comma list of {', '.join(ALL_METHODS)}; ppo_nokl and simpo have "
                             "no KL control and run once)")
    ppo_kl_coefs: list[float] = opt([0.02, 0.05, 0.2], "ppo's KL penalty coefficients (comma list)", ge=0)
    dpo_betas: list[float] = opt([0.05, 0.15, 0.5], "dpo's betas (comma list)", gt=0)
    ipo_betas: list[float] = opt([0.25, 0.5, 1.0], "ipo's betas (tau; comma list)", gt=0)
    grpo_betas: list[float] = opt([0.02, 0.05, 0.2], "grpo's and rloo's KL coefficients (comma list)", ge=0)
    rs_ns: list[int] = opt([2, 6], "rejection sampling's samples per prompt (comma list)", ge=1)
    kl_budgets: list[float] = opt([2.0, 5.0, 10.0], "KL budgets of the verdict table, nats (comma list)", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()  # types, and the options that are single values
        check_study_lists(self)

    def lab_config(self, seed: int) -> LabConfig:
        """Seed ``seed``'s lab: OUTPUT_ROOT/NAME/seed-S, the study's methods and every other lab option."""
        shared = {f.name: copy_value(getattr(self, f.name)) for f in dataclasses.fields(LabConfig)
                  if f.name not in STUDY_OWN_FIELDS}
        return LabConfig(name=f"{self.name}/seed-{seed}", output_root=self.output_root, seed=seed,
                         methods=list(self.methods), **shared)


def copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def check_study_lists(cfg: Any) -> None:
    """The study's list options: every value in its range, no empty or repeated seeds, known methods, a non-empty
    sweep for each chosen method, and at least one KL budget (each finite and > 0)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        inner = get_args(hints[f.name])
        if get_origin(hints[f.name]) is list and inner and inner[0] in (int, float):
            for value in getattr(cfg, f.name):
                check_value(f.name, value, inner[0], f.metadata)
    if not cfg.seeds:
        raise AlignlabError("a study needs at least 1 seed", field="seeds")
    repeated = sorted(s for s, n in Counter(cfg.seeds).items() if n > 1)
    if repeated:
        raise AlignlabError(f"seeds {repeated} are repeated (each seed is one lab)", field="seeds")
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown or not cfg.methods:
        raise AlignlabError(f"unknown methods {unknown} (choose from {', '.join(ALL_METHODS)})" if unknown
                            else "no methods to compare", field="methods")
    if len(set(cfg.methods)) < len(cfg.methods):
        raise AlignlabError(f"methods {cfg.methods} name one twice", field="methods")
    for method in cfg.methods:
        sweep = STUDY_SWEEPS.get(method)
        if sweep and not getattr(cfg, sweep.option):
            raise AlignlabError(f"method {method} is chosen but its sweep is empty (give at least one "
                                f"{sweep.lab_field})", field=sweep.option)
    if not cfg.kl_budgets:
        raise AlignlabError("give at least one KL budget (nats)", field="kl_budgets")


def _lab_fields_for_study() -> list[tuple[str, Any, Any]]:
    """Every :class:`LabConfig` field but :data:`STUDY_OWN_FIELDS`, with its type, default and help."""
    hints = _hints(LabConfig)
    return [(f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory,  # type: ignore
                                          metadata=f.metadata))
            for f in dataclasses.fields(LabConfig) if f.name not in STUDY_OWN_FIELDS]


# A study's options: its own (seeds, methods, sweeps, budgets), then every lab option with the lab's default, so
# a sweep value equal to the demo's default is the demo's own stage (the same key). Built from LabConfig's fields
# rather than copied, so a new lab option is a study option at once.
StudyConfig = dataclasses.make_dataclass(
    "StudyConfig", _lab_fields_for_study(), bases=(_StudyOptions,),
    namespace={"__module__": __name__, "__doc__": "A study (``alignlab lab study``): every method's reward/KL "
               "frontier traced by sweeping its KL control, one lab per seed, compared at KL budgets."})


def quick_study_config(**overrides: Any) -> Any:
    """The ``--quick`` study: :func:`quick_config`'s tiny model and budgets, two seeds, two values of ppo's and
    dpo's KL control, best-of-n, and budgets the tiny model's methods reach (best-of-n with n = 4 reaches
    log 4 - 3/4 = 0.64 nats). Under a minute; used in the test suite."""
    lab = {k: v for k, v in dataclasses.asdict(quick_config()).items() if k not in STUDY_OWN_FIELDS}
    base = dict(lab, name="study-quick", seeds=[0, 1], methods=["ppo", "dpo", "bon"], ppo_kl_coefs=[0.05, 0.5],
                dpo_betas=[0.15, 0.5], kl_budgets=[0.1, 0.5])
    base.update(overrides)
    return StudyConfig(**base)
