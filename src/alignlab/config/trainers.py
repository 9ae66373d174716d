"""The per-stage configs: one dataclass per trainer (SFT, reward model, DPO family, PPO, GRPO family), reward
scoring, best-of-n and rejection sampling, built from the shared model, training-loop and data options."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignlab.config.options import Checked, opt

__all__ = [
    "DPO_LOSSES",
    "BoNConfig",
    "DPOConfig",
    "DataConfig",
    "GRPOConfig",
    "ModelConfig",
    "PPOConfig",
    "RSConfig",
    "RewardConfig",
    "RewardScoreConfig",
    "SFTConfig",
    "SampleConfig",
    "TrainConfig",
]


@dataclass
class ModelConfig(Checked):
    """Which model to start from and how to adapt it."""

    model: str = opt("tiny-random", "checkpoint folder, hub id, or built-in: smollm2-135m-instruct, tiny-random")
    lora: bool = opt(False, "train a LoRA adapter instead of all weights")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = opt(0.0, "LoRA dropout", ge=0, lt=1)
    lora_targets: str = opt("all-linear", "modules LoRA adapts: 'all-linear' or a comma list, e.g. q_proj,v_proj")
    merge_lora: bool = opt(True, "merge the adapter into full weights when saving the final model")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    allow_pickle: bool = opt(False, "allow pickle-based .bin/.pt weights (unsafe with untrusted files)")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a checkpoint")
    offline: bool = opt(False, "never touch the network: hub ids load only from the local cache, else fail at "
                        "once (also on when HF_HUB_OFFLINE=1)")


@dataclass
class TrainConfig(ModelConfig):
    """The shared training loop: optimizer, schedule, accumulation, precision, checkpoints, logging."""

    output_dir: str = opt("runs/sft", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")
    seed: int = opt(0, "one seed for data order, initialisation and sampling")
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", gt=0)
    max_steps: int = opt(0, "optimizer steps to run; 0 = derived from epochs", ge=0)
    batch_size: int = opt(8, "examples per micro-batch on each process", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch x accum x processes)", ge=1)
    max_tokens: int = opt(2048, "most tokens one forward pass may hold: a longer micro-batch is cut into pieces "
                          "whose gradients accumulate (the same update, less activation memory; not for KTO, "
                          "DeepSpeed); 0 = no limit", ge=0)
    lr: float = opt(2e-5, "peak learning rate (AdamW); 0 leaves the weights as they are", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms)", ge=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW beta2", ge=0, lt=1)
    warmup_ratio: float = opt(0.03, "fraction of steps spent in linear warmup", ge=0, le=1)
    schedule: str = opt("cosine", "learning-rate decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    precision: str = opt("auto", "compute dtype: auto (bf16 where the hardware has it), bf16 or fp32",
                         choices=["auto", "bf16", "fp32"])
    group_by_length: bool = opt(True, "batch examples of similar length together to cut padding")
    log_every: int = opt(1, "log metrics every N optimizer steps", ge=1)
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)", ge=0)
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep (0 = all)", ge=0)
    resume: str = opt("auto", "auto (continue from the newest valid checkpoint when OUTPUT_DIR holds the same run: "
                      "stage, data files and training options; another run there is an error), latest (the newest "
                      "valid checkpoint even if the run differs), never (start afresh, removing the folder's earlier "
                      "run), or a checkpoint path")
    overwrite: bool = opt(False, "start afresh in an OUTPUT_DIR that holds another run: its checkpoints, logs and "
                          "final model are deleted first")
    on_nan: str = opt("stop", "a NaN/inf loss, gradient or weight after the update: stop (naming the last finite "
                      "checkpoint) or skip the step (the weights and optimizer state before it are restored; keeps a "
                      "copy of them during each step)", choices=["stop", "skip"])
    save_final: bool = opt(True, "save the final model (Hugging Face format) to OUTPUT_DIR/final")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class DataConfig(Checked):
    """Where the examples come from and how they become tokens."""

    data: str = opt("", "training data: .json/.jsonl/.csv/.parquet file (gz ok) or a hub dataset id")
    eval_data: str = opt("", "held-out data file; empty = split eval_fraction off the training data")
    eval_fraction: float = opt(0.05, "fraction of the training data held out when eval_data is empty", ge=0, lt=1)
    format: str = opt("auto", "record format: auto, alpaca, messages, sharegpt, prompt_completion, text")
    template: str = opt("auto", "prompt template: auto, alpaca, chat (the model's chat template), none")
    columns: str = opt("", "rename columns, e.g. 'instruction=Q,output=A'")
    max_length: int = opt(512, "maximum tokens per example", ge=1)
    truncation: str = opt("right", "over-long examples: right (cut the end, counted) or drop (counted)",
                          choices=["right", "drop"])
    skip_invalid: bool = opt(False, "skip invalid records (counted and reported) instead of stopping")
    limit: int = opt(0, "read at most N records (0 = all)", ge=0)
    dedupe: bool = opt(False, "drop exact duplicate examples, held-out examples identical to training ones, and "
                       "contradictory labels (all are counted in the data report either way)")


@dataclass
class SFTConfig(DataConfig, TrainConfig):
    """Supervised fine-tuning on instruction data."""

    output_dir: str = opt("runs/sft", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")


DPO_LOSSES = ("dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto")


@dataclass
class DPOConfig(DataConfig, TrainConfig):
    """Preference optimisation from pairs (the DPO family) or unpaired feedback (KTO)."""

    output_dir: str = opt("runs/dpo", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/")
    lr: float = opt(1e-6, "peak learning rate (AdamW); preference losses want a small one", ge=0)
    format: str = opt("auto", "record format: auto, explicit, implicit, sharegpt, ranking, oasst (pairs; rankings "
                      "become all their pairs) or unpaired (kto)")
    template: str = opt("auto", "prompt template: auto (chat for message prompts, none for text), chat, alpaca, none")
    max_length: int = opt(512, "maximum tokens of prompt + response", ge=1)
    truncation: str = opt("right", "over-long pairs: right (prompt cut to max_prompt_length from the left, responses "
                          "cut at the end; counted) or drop (counted)", choices=["right", "drop"])
    loss: str = opt("dpo", "preference loss: dpo, cdpo, robust, ipo, hinge (with a reference), simpo, orpo "
                    "(reference-free), kto (unpaired feedback, or pairs split into both kinds)",
                    choices=list(DPO_LOSSES))
    beta: float = opt(0.0, "the loss's beta; 0 = its usual value: 0.1 (dpo, cdpo, robust, ipo, hinge, kto; orpo's "
                      "lambda), 2.0 (simpo)", ge=0)
    label_smoothing: float = opt(0.0, "label-flip probability: cdpo (needs > 0), robust, simpo", ge=0, le=0.5)
    simpo_gamma: float = opt(1.0, "SimPO's target reward margin", ge=0)
    rpo_alpha: float | None = opt(None, "weight of an NLL term on the chosen responses added to the loss (RPO); "
                                  "none = 1 for orpo (its SFT term), 0 otherwise", ge=0)
    desirable_weight: float = opt(1.0, "KTO: weight of the desirable examples' losses", ge=0)
    undesirable_weight: float = opt(1.0, "KTO: weight of the undesirable examples' losses", ge=0)
    reference: str = opt("", "reference model (folder or built-in name); empty = the starting model, and with LoRA "
                         "the base weights with the adapter disabled (no second model in memory)")
    precompute_ref: bool = opt(False, "score the data with the reference once before training and cache the "
                               "log-probs on disk (the reference model is then not kept in memory)")
    ref_cache_dir: str = opt("", "folder of cached reference log-probs; empty = the user cache (ALIGNLAB_CACHE)/"
                             "ref-logps")
    max_prompt_length: int = opt(0, "maximum prompt tokens (0 = only max_length limits); longer prompts keep their "
                                 "end (truncation=right) or are dropped (truncation=drop)", ge=0)
    group_rankings: bool = opt(True, "keep each ranking's pairs together in one micro-batch, each answer encoded once "
                               "for all its pairs (the K-wise batching of the reward model); batch_size then "
                               "counts records, a ranking of K answers bringing its K(K-1)/2 pairs")


@dataclass
class RewardConfig(DataConfig, TrainConfig):
    """Reward-model training on preference pairs and rankings (``alignlab rm train``)."""

    output_dir: str = opt("runs/rm", "run folder: config.yaml, metrics.jsonl, checkpoints/, final/ (+ "
                          "reward_stats.json), eval_scores.jsonl, eval_stats.json, reward_hist.png")
    format: str = opt("auto", "preference format: auto, explicit, implicit (HH transcripts), sharegpt, ranking, "
                      "oasst")
    truncation: str = opt("right", "over-long responses: right (cut the end, counted), left (cut the start of "
                          "the prompt so the response and its EOS stay whole, counted) or drop (drop the "
                          "record, counted)", choices=["right", "left", "drop"])
    expand_pairs: bool = opt(False, "train on the K(K-1)/2 pairs of every ranking as separate examples "
                             "instead of one K-wise example per prompt (for comparison)")
    margin: str = opt("none", "Llama-2 margin in the loss: none; 'margin' (the record's margin column); "
                      "'scores' (differences of the responses' score columns)",
                      choices=["none", "margin", "scores"])
    margin_scale: float = opt(1.0, "multiply every margin by this", ge=0)
    center_rewards_coef: float = opt(0.0, "reward centring: add coef x mean(r^2) (Eisenstein et al. 2023; "
                                     "TRL suggests 0.01)", ge=0)
    stats_samples: int = opt(2000, "training responses scored after training for reward_stats.json (a seeded "
                             "random sample when there are more; 0 = all)", ge=0)


@dataclass
class RewardScoreConfig(Checked):
    """Score a data file with a reward model or a Python function (``alignlab rm score``)."""

    model: str = opt("", "reward model folder (from alignlab rm train), or module:function / file.py:function")
    data: str = opt("", "preference file (pairs, rankings, OASST trees, HH) or prompt/response records")
    output: str = opt("", "scored copy (JSONL); empty = DATA's name + .scored.jsonl in the current folder")
    format: str = opt("auto", "preference format: auto, explicit, implicit, sharegpt, ranking, oasst")
    columns: str = opt("", "rename columns, e.g. 'prompt=question,chosen=good'")
    template: str = opt("", "prompt template; empty = the one the reward model was trained with",
                        choices=["", "auto", "chat", "alpaca", "none"])
    max_length: int = opt(0, "tokens per prompt+response; 0 = the reward model's training max_length", ge=0)
    batch_size: int = opt(16, "sequences per forward pass", ge=1)
    normalize: bool = opt(False, "report (score - mean) / std with the model's reward_stats.json")
    skip_invalid: bool = opt(False, "skip invalid records (counted and reported) instead of stopping")
    limit: int = opt(0, "read at most N records (0 = all)", ge=0)
    allow_pickle: bool = opt(False, "allow pickle-based .bin/.pt weights (unsafe with untrusted files)")


@dataclass
class PPOConfig(TrainConfig):
    """RLHF with PPO (``alignlab ppo``): sample responses, score them, and push the policy towards high scores
    at a controlled KL from the reference. One *iteration* = one rollout + ``ppo_epochs`` passes over it; the
    rollout holds ``batch_size x grad_accum x num_mini_batches`` responses per process. ``epochs`` and
    ``max_steps`` are not used (``iterations`` counts the run); ``save_every``/``eval_every``/``log_every``
    count iterations."""

    output_dir: str = opt("runs/ppo", "run folder: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/")
    policy: str = opt("", "the policy to train (an alias of --model; the SFT model, a folder or a built-in)")
    lr: float = opt(1e-5, "peak learning rate (AdamW) of the policy and the value model; LoRA wants ~1e-4", ge=0)
    schedule: str = opt("linear", "learning-rate decay over the run's optimizer steps",
                        choices=["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.0, "fraction of optimizer steps spent in linear warmup", ge=0, le=1)
    batch_size: int = opt(8, "responses per forward/backward micro-batch on each process", ge=1)
    max_tokens: int = opt(0, "not used by PPO: its micro-batches hold batch_size responses", ge=0)
    # -- prompts
    prompts: str = opt("", "training prompts: .txt (one per line), a JSON/JSONL list, or any instruction or "
                       "preference file (its prompts)")
    eval_prompts: str = opt("", "held-out prompts (same formats); empty = eval_fraction of --prompts")
    eval_fraction: float = opt(0.1, "fraction of --prompts held out when --eval-prompts is empty (0 = none)",
                               ge=0, lt=1)
    limit: int = opt(0, "read at most N prompts (0 = all)", ge=0)
    template: str = opt("auto", "how a prompt is rendered: auto (the tokenizer's chat template when it has one, "
                        "else alpaca for instruction records and none for text), chat, alpaca, none",
                        choices=["auto", "chat", "alpaca", "none"])
    max_prompt_length: int = opt(512, "longest prompt in tokens (prompt + max_new_tokens must also fit the model's "
                                 "context)", ge=1)
    long_prompts: str = opt("error", "a prompt that does not fit: error (naming it) or drop (counted)",
                            choices=["error", "drop"])
    # -- roles
    reward_model: str = opt("", "reward: a reward-model folder (alignlab rm train), or module:function")
    reward: str = opt("", "reward: a Python function module:function or file.py:function, "
                      "f(prompts, responses) -> list[float] (e.g. alignlab.reward_functions:sentiment)")
    reward_batch_size: int = opt(16, "sequences per reward-model forward pass", ge=1)
    reference: str = opt("", "reference model; empty = the starting policy (with LoRA: the policy with its adapter "
                         "disabled, no second model)")
    value_model: str = opt("", "value model (critic) initialisation: empty = the reward model when --reward-model "
                           "is a folder, else the policy (with a zeroed head); or a checkpoint folder")
    share_backbone: bool = opt(False, "no separate value model: a value head on the policy's own last hidden "
                               "states (saves a model's memory and compute; the value loss then also shapes the "
                               "policy's features)")
    # -- rollout
    iterations: int = opt(20, "PPO iterations (rollout -> score -> advantages -> update)", ge=1)
    num_mini_batches: int = opt(1, "optimizer steps per PPO epoch over the rollout", ge=1)
    ppo_epochs: int = opt(4, "passes over each rollout", ge=1)
    responses_per_prompt: int = opt(1, "responses sampled per prompt in a rollout (> 1: the rollout holds "
                                    "rollout/k prompts, and each prompt is encoded once for its k responses in the "
                                    "forward passes)", ge=1)
    max_new_tokens: int = opt(64, "longest response in tokens", ge=1)
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature", gt=0)
    top_p: float = opt(1.0, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated strings that end a response (like EOS; \\n escapes are decoded)"})
    generation_batch_size: int = opt(0, "prompts sampled together (0 = the whole rollout at once)", ge=0)
    backend: str = opt("hf", "rollout generation: hf (Hugging Face generate) or vllm (GPU, needs vllm; the "
                       "policy's weights are copied into it every iteration)", choices=["hf", "vllm"])
    unfinished_penalty: float = opt(0.0, "subtracted from the score of a response that ends neither with EOS nor "
                                    "a stop string within max_new_tokens")
    # -- rewards
    kl_estimator: str = opt("k1", "per-token KL penalty estimator: k1 (log ratio, unbiased, the classic RLHF "
                            "penalty) or k3 (unbiased and >= 0, lower variance)", choices=["k1", "k3"])
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (the starting value when target_kl > 0)", ge=0)
    target_kl: float = opt(0.0, "adaptive KL controller (Ziegler et al. 2019): steer the KL per response (nats) "
                           "to this target; 0 = a fixed kl_coef", ge=0)
    kl_horizon: float = opt(10000, "adaptive KL controller horizon, in responses", gt=0)
    reward_normalization: str = opt("none", "normalise scores: none; running (running mean/std of the scores "
                                    "seen so far); stats (the reward model's reward_stats.json)",
                                    choices=["none", "running", "stats"])
    reward_clip: float = opt(0.0, "clip (normalised) scores to [-c, c] (0 = off)", ge=0)
    whiten_rewards: bool = opt(False, "rescale the per-token rewards to unit variance before GAE")
    # -- update
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "normalise advantages to zero mean, unit variance over real tokens")
    clip_range: float = opt(0.2, "PPO policy ratio clip epsilon", gt=0)
    clip_range_value: float = opt(0.2, "value clip around the rollout-time values (0 = no clipping)", ge=0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (0 = off; entropy is still logged)", ge=0)
    # -- evaluation and logging
    eval_greedy: bool = opt(False, "held-out generations by greedy decoding (default: sampled at the rollout "
                            "temperature with a fixed seed, so the KL estimate is unbiased)")
    log_samples: int = opt(4, "sample responses written to samples.jsonl each iteration (and at each evaluation)", ge=0)


@dataclass
class GRPOConfig(TrainConfig):
    """Critic-free online RL (``alignlab grpo``): GRPO, Dr. GRPO, RLOO and REINFORCE++ in one trainer. One
    *iteration* samples ``group_size`` responses for each of ``prompts_per_iteration`` prompts, scores them, turns
    the scores into advantages with a baseline from the group (or the batch), then makes ``update_epochs`` passes
    of ``num_mini_batches`` optimizer steps over the rollout. No value model; no reference when ``beta = 0``.
    ``epochs``, ``max_steps`` and ``grad_accum`` are not used (micro-batches hold ``batch_size`` responses)."""

    output_dir: str = opt("runs/grpo", "run folder: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/")
    policy: str = opt("", "the policy to train (an alias of --model)")
    lr: float = opt(1e-6, "peak learning rate (AdamW), > 0; LoRA or the tiny lab runs want ~1e-4 or more")
    schedule: str = opt("constant", "learning-rate decay over the run's optimizer steps",
                        choices=["cosine", "linear", "constant"])
    warmup_ratio: float = opt(0.0, "fraction of optimizer steps spent in linear warmup, in [0, 1)")
    batch_size: int = opt(8, "responses per forward/backward micro-batch (>= 1)")
    max_tokens: int = opt(0, "not used by GRPO: its micro-batches hold batch_size responses")
    # -- prompts
    prompts: str = opt("", "training prompts: .txt (one per line), a JSON/JSONL list, any instruction or preference "
                       "file (its prompts), or task:NAME:train (e.g. task:arithmetic:train)")
    eval_prompts: str = opt("", "held-out prompts (same formats); empty = eval_fraction of --prompts")
    eval_fraction: float = opt(0.1, "fraction of --prompts held out when --eval-prompts is empty, in [0, 1) (0 = "
                               "none)")
    limit: int = opt(0, "read at most N prompts (0 = all)")
    template: str = opt("auto", "how a prompt is rendered: auto (the chat template when the tokenizer has one, else "
                        "alpaca for instruction records and none for text), chat, alpaca, none",
                        choices=["auto", "chat", "alpaca", "none"])
    max_prompt_length: int = opt(512, "longest prompt in tokens, >= 1 (prompt + max_new_tokens must also fit the "
                                 "model's context)")
    long_prompts: str = opt("error", "a prompt that does not fit: error (naming it) or drop (counted)",
                            choices=["error", "drop"])
    # -- reward and reference
    reward: str = opt("", "reward: comma list of Python functions module:function or file.py:function, "
                      "f(prompts, responses) -> list[float], and/or task:NAME (a built-in task's verifiable "
                      "reward, e.g. task:arithmetic); combined with --reward-weights")
    reward_weights: list[float] = field(default_factory=list, metadata={
        "help": "comma list of weights, one per --reward entry (default: all 1.0); the reward is their weighted sum"})
    reward_model: str = opt("", "or a reward model: an alignlab rm folder or any HF sequence-classification "
                            "checkpoint (added to --reward with weight 1 when both are given)")
    reward_batch_size: int = opt(16, "sequences per reward-model forward pass (>= 1)")
    reference: str = opt("", "reference model for the KL term; empty = the starting policy (with LoRA: the policy "
                         "with its adapter disabled); not loaded at all when beta = 0")
    # -- rollout
    iterations: int = opt(20, "iterations (rollout -> score -> advantages -> update), >= 1")
    prompts_per_iteration: int = opt(4, "prompts sampled per iteration on each process (>= 1); the rollout holds "
                                     "prompts_per_iteration x group_size responses")
    group_size: int = opt(8, "responses sampled per prompt (>= 2 for grpo, dr_grpo, rloo; >= 1 for reinforce_pp)")
    num_mini_batches: int = opt(1, "optimizer steps per pass over the rollout (>= 1; a group is never split)")
    update_epochs: int = opt(1, "passes over each rollout (>= 1); after the first the importance ratio to the "
                             "rollout policy is clipped")
    max_new_tokens: int = opt(64, "longest response in tokens (>= 1); also L of loss_aggregation=constant")
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs are taken at the same temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold in (0, 1] (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated strings that end a response (like EOS; \\n escapes are decoded)"})
    generation_batch_size: int = opt(0, "prompts sampled together (0 = the whole rollout at once)")
    backend: str = opt("hf", "rollout generation: hf (Hugging Face generate) or vllm (GPU, needs vllm; the policy's "
                       "weights are copied into it every iteration)", choices=["hf", "vllm"])
    # -- advantages and loss
    advantage: str = opt("grpo", "advantage estimator: grpo (group mean and std), dr_grpo (group mean only), rloo "
                         "(leave-one-out mean), reinforce_pp (batch-normalised returns, KL in the reward)",
                         choices=["grpo", "dr_grpo", "rloo", "reinforce_pp"])
    loss_aggregation: str = opt("auto", "how per-token losses become one number: token_mean (DAPO), sequence_mean "
                                "(GRPO), constant (sum / (responses x max_new_tokens), Dr. GRPO); auto = "
                                "sequence_mean for grpo, constant for dr_grpo, token_mean otherwise",
                                choices=["auto", "token_mean", "sequence_mean", "constant"])
    clip_low: float = opt(0.2, "importance-ratio clip below 1: 1 - clip_low, in [0, 1)")
    clip_high: float = opt(0.2, "importance-ratio clip above 1: 1 + clip_high, >= 0 (DAPO's clip-higher: 0.28)")
    beta: float = opt(0.0, "KL coefficient to the reference, >= 0; 0 = no KL and no reference in memory")
    kl_in: str = opt("auto", "where the KL goes: loss (k3 estimator, GRPO), reward (k1 per token, subtracted from "
                     "the reward; RLOO, REINFORCE++); auto = reward for rloo and reinforce_pp, loss otherwise",
                     choices=["auto", "loss", "reward"])
    dynamic_sampling: bool = opt(True, "drop groups whose rewards are all equal (no signal; DAPO), counted in the "
                                 "log as dropped_groups")
    overlong: str = opt("none", "responses cut at max_new_tokens: none (kept), filter (masked out of the loss, "
                        "counted as filtered_overlong), penalty (overlong_penalty subtracted from their reward)",
                        choices=["none", "filter", "penalty"])
    overlong_penalty: float = opt(1.0, "with overlong=penalty: subtracted from the reward, >= 0")
    importance_correction: str = opt("auto", "truncated importance sampling for a sampler that differs from the "
                                     "trained model (the bf16 sampling copy, vLLM): the mismatch is measured and "
                                     "logged every iteration and each token's loss weighted by min(ratio, "
                                     "importance_cap); auto = on where they differ, off = measure nothing",
                                     choices=["auto", "off"])
    importance_cap: float = opt(2.0, "cap C of the truncated importance weights, > 0")
    # -- evaluation and logging
    eval_greedy: bool = opt(True, "held-out answers by greedy decoding (default, the usual accuracy protocol); "
                            "false = sampled at the rollout temperature with a fixed seed")
    log_samples: int = opt(4, "sample responses written to samples.jsonl each iteration (and at each evaluation)")


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleConfig(Checked):
    """What to sample from and how to score it (shared by ``bon`` and ``rs``)."""

    prompts: str = opt("", "prompts: .txt (one per line) or any instruction/preference file")
    reward_model: str = opt("", "reward model folder (from alignlab rm train)")
    reward: str = opt("", "or a Python reward function module:function(prompts, responses) -> scores")
    n: int = opt(4, "samples per prompt", ge=1)
    template: str = opt("chat", "how prompts are rendered", choices=["chat", "alpaca", "none"])
    temperature: float = opt(1.0, "sampling temperature", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    max_new_tokens: int = opt(64, "tokens generated per sample", ge=1)
    max_prompt_tokens: int = opt(512, "prompts longer than this are skipped (counted)", ge=1)
    gen_batch_size: int = opt(32, "sequences generated together", ge=1)
    backend: str = opt("hf", "generation: hf (Hugging Face generate) or vllm (GPU, needs vllm)",
                       choices=["hf", "vllm"])
    limit_prompts: int = opt(0, "use at most N prompts (0 = all)", ge=0)
    on_bad_score: str = opt("stop", "a sample whose reward fails or is NaN: stop, or skip it (counted)",
                            choices=["stop", "skip"])
    gold: str = opt("", "optional second scorer module:function that judges the results (e.g. a gold score "
                        "next to a learned reward model)")


@dataclass
class BoNConfig(SampleConfig):
    """Best-of-n at inference."""

    model: str = opt("smollm2-135m-instruct", "the policy to sample from")
    output_dir: str = opt("runs/bon", "folder for samples.jsonl and summary.json")
    seed: int = opt(0, "sampling seed")
    allow_pickle: bool = opt(False, "allow pickle-based weights (unsafe)")


@dataclass
class RSConfig(SampleConfig, SFTConfig):
    """Rejection-sampling fine-tuning: the SFT options apply to every round's fine-tuning."""

    output_dir: str = opt("runs/rs", "run folder: round-N/{samples,kept}.jsonl, round-N/sft/, final/")
    rounds: int = opt(2, "rounds of sample -> select -> fine-tune", ge=1)
    select: str = opt("best", "which samples to keep per prompt", choices=["best", "top_k", "threshold"])
    top_k: int = opt(1, "with select=top_k: how many to keep per prompt", ge=1)
    threshold: float = opt(0.0, "with select=threshold: keep samples scoring at least this")
    data: str = opt("", "(unused: rejection sampling makes its own data)")
    eval_prompts: str = opt("", "held-out prompts: the start and every round's policy answer them once, scored "
                                "by the same reward, with KL from the start model (empty = no evaluation)")
    eval_seed: int = opt(1234, "sampling seed of the held-out answers (the same for every round)")
