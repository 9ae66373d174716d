"""Reward-model training: learn a scalar score whose differences predict which response people preferred.

The loop, top to bottom: load preference pairs and rankings -> hold out whole source records -> (optionally
expand every ranking into its K(K-1)/2 pairs) -> encode every response as ``prompt_ids + completion_ids`` ->
load the model with a scalar score head (+LoRA, head trained too) -> plan every optimizer step (one example =
one prompt with its K responses) -> for each step: per micro-batch, all its responses go through one
forward with each prompt encoded once (``train/forward.py: collate_shared_prompt``: a prompt's responses
follow it and attend to it and to themselves only, attention computed response by response), the rewards
are reshaped to ``(b, k)`` with a mask (prompts with different K share a
batch), the K-wise ranking loss (InstructGPT; equal to Bradley-Terry for pairs) is summed over prompts and
divided by the global batch's prompt count (plus the centring term over its response count), so
accumulation and multiple processes give the gradient of one big batch -> backward, clip, step -> log,
evaluate (pairwise accuracy, top-1 accuracy and Kendall's tau on rankings, score distribution), checkpoint ->
score the training responses with the final model for ``reward_stats.json`` -> save the model (LoRA merged,
score head included), the stats, ``eval_scores.jsonl`` and a score histogram.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlab.config import RewardConfig, parse_columns
from alignlab.data.hygiene import check_hygiene
from alignlab.data.preference import PreferenceRecord, expand_to_pairs, load_preferences
from alignlab.data.templates import require_chat_template
from alignlab.data.tokenize import encode_prompt_completion
from alignlab.errors import AlignlabError
from alignlab.losses.reward_model import kwise_ranking_loss
from alignlab.models import count_parameters, load_tokenizer
from alignlab.scoring import (
    REWARD_STATS_FILE,
    fit_to_length,
    pad_right,
    prepare_reward_tokenizer,
    ranking_agreement,
    resolve_template,
    reward_stats,
    score_last_token,
    score_sequences,
)
from alignlab.train.forward import (
    SharedPromptBatch,
    collate_shared_prompt,
    shared_prompt_layout,
    shared_prompt_scores,
    split_shared_prefix,
)
from alignlab.train.loop import Run, micro_batches, plan_steps
from alignlab.train.policy import prepare_policy

__all__ = [
    "RankingBatch",
    "RewardDataReport",
    "RewardExample",
    "batch_sums",
    "collate_rankings",
    "ranking_rewards",
    "encode_preferences",
    "evaluate_reward",
    "rewards_grid",
    "split_by_record",
    "train_reward",
]

# ----------------------------------------------------------------------------------------------- data


@dataclass
class RewardExample:
    """One prompt with its K responses, encoded.

    Attributes:
        sequences: K token id lists (``prompt_ids + completion_ids``), best response first.
        margins: per-response margin scores (the pair ``i < j`` gets margin ``margins[i] - margins[j]``), or
            None for no margin.
        record: the 1-based record number in the source file.
        prompt: the prompt (kept for ``eval_scores.jsonl``).
        responses: the response texts, best first.
        truncated: how many of the K sequences were cut to ``max_length``.
    """

    sequences: list[list[int]]
    margins: list[float] | None
    record: int
    prompt: Any
    responses: list[str]
    truncated: int = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def encoded(self) -> int:
        """Its tokens with the prompt encoded once, then each response: what the shared-prompt layout runs when
        it keeps the example in one segment (packed rows may give long responses prompt copies of their own)."""
        prefix, suffixes = split_shared_prefix(self.sequences)
        return len(prefix) + sum(map(len, suffixes))


@dataclass
class RewardDataReport:
    """What encoding did to the preference records: nothing is dropped or skipped without being counted."""

    source: str = ""
    records: int = 0
    kept: int = 0
    responses: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skipped_invalid: Counter[str] = field(default_factory=Counter)
    skipped_messages: list[str] = field(default_factory=list)
    margin_missing: int = 0
    templates: Counter[str] = field(default_factory=Counter)
    max_length: int = 0

    def summary(self) -> str:
        def reasons(counter: Counter[str]) -> str:
            return "".join(f"\n    {n:6d}  {why}" for why, n in counter.most_common())

        lines = [
            f"{self.source}: encoded {self.kept} of {self.records} prompts ({self.responses} responses, "
            f"{self.tokens} tokens; template {', '.join(sorted(self.templates)) or '-'})",
            f"  truncated responses (max_length {self.max_length}): {self.truncated}",
            f"  dropped: {sum(self.dropped.values())}{reasons(self.dropped)}",
            f"  skipped invalid: {sum(self.skipped_invalid.values())}{reasons(self.skipped_invalid)}",
        ]
        lines.extend(f"    e.g. {m}" for m in self.skipped_messages)
        if self.margin_missing:
            lines.append(f"  no margin column (trained without margin): {self.margin_missing}")
        return "\n".join(lines)


def _margins(item: PreferenceRecord, margin: str, scale: float) -> list[float] | None:
    """Per-response margin scores of one record (None: this record has no margin data)."""
    if margin == "margin":
        if item.margin is not None and len(item.responses) == 2:
            return [scale * item.margin, 0.0]
        return None
    if margin == "scores":
        return None if item.scores is None else [scale * s for s in item.scores]
    return None


def encode_preferences(
    records: list[PreferenceRecord],
    tokenizer: Any,
    *,
    template: str = "auto",
    max_length: int = 512,
    truncation: str = "right",
    skip_invalid: bool = False,
    margin: str = "none",
    margin_scale: float = 1.0,
    source: str = "",
) -> tuple[list[RewardExample], RewardDataReport]:
    """Encode preference records for reward-model training.

    Every response becomes ``prompt_ids + completion_ids`` (:func:`encode_prompt_completion`, ending with EOS,
    also where a record marks a response unfinished: the scorer sees text alone at use time and appends EOS to
    every response, so the score is read at the same kind of token in training and in use) cut to
    ``max_length`` by ``truncation`` (see :func:`alignlab.scoring.fit_to_length`). A record is dropped
    (counted) when one of its responses is dropped, when truncation makes two responses identical, or when a
    sequence ends with the pad token; a record that cannot be encoded is an error, or with ``skip_invalid``
    counted and skipped.

    Args:
        records: from :func:`load_preferences` (responses best first).
        tokenizer: the reward model's tokenizer, with a pad token distinct from EOS.
        template: ``"auto"`` (chat for message prompts, none for text), ``"chat"``, ``"alpaca"`` or ``"none"``.
        max_length: the longest sequence in tokens.
        truncation: ``"right"``, ``"left"`` or ``"drop"``.
        skip_invalid: count and skip records that cannot be encoded.
        margin: ``"none"``, ``"margin"`` (the records' margin column) or ``"scores"`` (their scores).
        margin_scale: multiplies every margin.
        source: the file name, for the report and error messages.

    Returns:
        ``(examples, report)``.
    """
    if max_length < 2:
        raise AlignlabError(f"max_length must be at least 2, found {max_length}", field="max_length")
    report = RewardDataReport(source=source, records=len(records), max_length=max_length)
    examples: list[RewardExample] = []
    checked_chat = False
    for item in records:
        resolved = resolve_template(template, item.prompt)
        if resolved == "chat" and not checked_chat:
            require_chat_template(tokenizer)  # a configuration error: raise, never skip
            checked_chat = True
        sequences: list[list[int]] = []
        truncated = 0
        reason = None
        try:
            for response in item.responses:
                prompt_ids, completion_ids = encode_prompt_completion(tokenizer, item.prompt, response,
                                                                      template=resolved)
                ids, what = fit_to_length(prompt_ids, completion_ids, max_length=max_length,
                                          truncation=truncation, bos_token_id=tokenizer.bos_token_id)
                if ids is None:
                    reason = what
                    break
                truncated += int(what == "truncated")
                sequences.append(ids)
        except AlignlabError as error:
            if error.field in ("template", "eos_token"):
                raise AlignlabError(error.message, file=item.source or source, field=error.field) from error
            wrapped = AlignlabError(error.message, file=item.source or source, record=item.record,
                                    field=error.field)
            if not skip_invalid:
                raise wrapped from error
            report.skipped_invalid[error.message.split(":")[0]] += 1
            if len(report.skipped_messages) < 5:
                report.skipped_messages.append(str(wrapped))
            continue
        if reason is None and len({tuple(s) for s in sequences}) < len(sequences):
            reason = "responses identical after truncation"
        if reason is None and any(s[-1] == tokenizer.pad_token_id for s in sequences):
            reason = "a sequence ends with the pad token"
        if reason is not None:
            report.dropped[reason] += 1
            continue
        margins = _margins(item, margin, margin_scale) if margin != "none" else None
        if margin != "none" and margins is None:
            report.margin_missing += 1
            margins = [0.0] * len(sequences)
        examples.append(RewardExample(sequences, margins, item.record, item.prompt, list(item.responses), truncated))
        report.kept += 1
        report.responses += len(sequences)
        report.tokens += sum(len(s) for s in sequences)
        report.truncated += truncated
        report.templates[resolved] += 1
    if margin != "none" and examples and report.margin_missing == len(examples):
        column = "margin" if margin == "margin" else "score (scores, score_chosen/score_rejected)"
        raise AlignlabError(f"margin={margin} but no record has a {column} column", file=source, field="margin")
    return examples, report


def split_by_record(records: list[PreferenceRecord], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the source records (at least one when fraction > 0), chosen by ``seed``.

    The unit is the source record, not the normalised one: all the rankings of one OpenAssistant tree land on
    the same side, so no conversation is both trained on and evaluated.
    """
    ids = sorted({r.record for r in records})
    if fraction <= 0 or len(ids) < 2:
        return records, []
    n_eval = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    order = np.random.default_rng(seed).permutation(len(ids))
    held = {ids[i] for i in order[:n_eval].tolist()}
    return [r for r in records if r.record not in held], [r for r in records if r.record in held]


# ----------------------------------------------------------------------------------------------- batches


@dataclass
class RankingBatch:
    """A micro-batch of ``b`` prompts with up to ``k`` responses each.

    Two layouts of the same ``n`` responses (listed prompt by prompt, best first): ``shared`` (each prompt
    encoded once, :class:`~alignlab.train.forward.SharedPromptBatch`), or, when ``shared`` is None, every
    response as its own ``prompt + response`` row of the right-padded ``input_ids``, ``attention_mask``
    ``(n, t)`` (for engines that shard weights between calls, where the score head cannot be applied outside
    the model's forward). ``mask``: ``(b, k)`` bool, True on real responses; ``margins``: ``(b, k)`` margin
    scores or None; ``tokens``: the tokens of the ``n`` sequences as separate rows (the data's size, whatever
    the layout); ``encoded``: the tokens the forward actually runs (padding excluded).
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    shared: SharedPromptBatch | None
    mask: torch.Tensor
    margins: torch.Tensor | None
    tokens: int
    encoded: int

    def to(self, device: torch.device | str) -> RankingBatch:
        def move(x: Any) -> Any:
            return None if x is None else x.to(device)

        return RankingBatch(move(self.input_ids), move(self.attention_mask), move(self.shared), self.mask.to(device),
                            move(self.margins), self.tokens, self.encoded)


def collate_rankings(examples: list[RewardExample], pad_token_id: int, *, shared: bool = True,
                     layout: dict[str, Any] | None = None) -> RankingBatch:
    """All responses of ``examples`` in one batch (with ``shared``, each prompt encoded once for its responses,
    laid out as ``layout`` says, :func:`~alignlab.train.forward.shared_prompt_layout`; else one padded row per
    response), with the ``(b, k)`` mask of real slots."""
    sequences = [s for e in examples for s in e.sequences]
    tokens = sum(len(s) for s in sequences)
    input_ids = attention_mask = packed = None
    if shared:
        packed = collate_shared_prompt([split_shared_prefix(e.sequences) for e in examples], pad_token_id,
                                       **(layout or {}))
        encoded = packed.encoded
    else:
        input_ids, attention_mask = pad_right(sequences, pad_token_id)
        encoded = tokens
    k = max(len(e.sequences) for e in examples)
    mask = torch.zeros((len(examples), k), dtype=torch.bool)
    for row, e in enumerate(examples):
        mask[row, : len(e.sequences)] = True
    margins = None
    if any(e.margins is not None for e in examples):
        margins = torch.zeros((len(examples), k), dtype=torch.float32)
        for row, e in enumerate(examples):
            if e.margins is not None:
                margins[row, : len(e.margins)] = torch.tensor(e.margins, dtype=torch.float32)
    return RankingBatch(input_ids, attention_mask, packed, mask, margins, tokens, encoded)


def ranking_rewards(model: torch.nn.Module, batch: RankingBatch) -> torch.Tensor:
    """The ``(n,)`` float32 rewards of a :class:`RankingBatch`'s responses, in its order."""
    if batch.shared is not None:
        return shared_prompt_scores(model, batch.shared)
    return score_last_token(model, batch.input_ids, batch.attention_mask)


def rewards_grid(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place the flat ``(n,)`` rewards (prompt by prompt) into a ``(b, k)`` grid; empty slots hold 0."""
    return torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device).masked_scatter(mask, rewards)


def batch_sums(rewards: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over one micro-batch for the training log: ``wins`` (pairs ``i < j`` with ``r_i > r_j``, ties
    half), ``pairs``, ``reward`` (sum over real responses) and ``margin`` (sum of best minus worst reward).

    Args:
        rewards: ``(b, k)`` best first; ``mask``: ``(b, k)`` bool, True on real responses.
    """
    diff = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)  # (b, k, k): r_i - r_j
    pairs = torch.ones_like(diff, dtype=torch.bool).triu(1) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    worst = rewards.gather(1, (mask.sum(-1) - 1).unsqueeze(1)).squeeze(1)
    return {
        "wins": float(((diff > 0).float() + 0.5 * (diff == 0).float())[pairs].sum()),
        "pairs": float(pairs.sum()),
        "reward": float(rewards[mask].sum()),
        "margin": float((rewards[:, 0] - worst).sum()),
    }


# ----------------------------------------------------------------------------------------------- evaluation


@contextmanager
def full_precision(run: Run, model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in fp32 inside this block, without accelerate's mixed-precision forward wrapper.

    ``accelerator.prepare`` wraps the model's ``forward`` in bf16 autocast (and keeps the original as
    ``_original_forward``); an outer ``autocast(enabled=False)`` cannot switch that off. Held-out scores and
    reward statistics are computed in fp32 so they equal what :func:`alignlab.scoring.load_scorer` returns for
    the saved model: bf16 rounds rewards to about three digits, enough to move them by a few hundredths.
    """
    inner = run.accelerator.unwrap_model(model)
    original = inner.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = inner.__dict__.get("forward")
    inner.forward = original
    try:
        yield
    finally:
        if wrapped is not None:
            inner.forward = wrapped
        else:
            del inner.forward


@torch.no_grad()
def evaluate_reward(model: torch.nn.Module, examples: list[RewardExample], pad_token_id: int, run: Run,
                    batch_size: int) -> tuple[dict[str, float], list[list[float]]]:
    """Held-out metrics and every example's scores (on every process).

    Scoring runs in fp32 (:func:`full_precision`), as :func:`alignlab.scoring.load_scorer` does.

    Metrics: ``eval_loss`` (K-wise loss with the configured margins), ``eval_accuracy`` (pairwise accuracy
    over every pair ``i < j`` of every prompt; for pair data the usual accuracy), ``eval_top1_accuracy`` and
    ``eval_kendall_tau`` (prompts with three or more responses), ``eval_reward_mean``/``_std`` and
    ``eval_margin`` (mean reward of the best minus the worst response).
    """
    from accelerate.utils import gather_object

    mine = sorted(range(run.rank, len(examples), run.world_size), key=lambda i: len(examples[i]))
    scored = []
    layout = shared_prompt_layout(model)
    was_training = model.training
    model.eval()
    with full_precision(run, model), torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = collate_rankings([examples[i] for i in chunk], pad_token_id, shared=not run.shards_weights,
                                     layout=layout)
            flat, position = ranking_rewards(model, batch.to(run.device)).tolist(), 0
            for i in chunk:
                k = len(examples[i].sequences)
                scored.append((i, flat[position : position + k]))
                position += k
    model.train(was_training)
    if run.world_size > 1:
        scored = gather_object(scored)
    per_example: list[list[float]] = [[] for _ in examples]
    for i, scores in scored:
        per_example[i] = scores
    losses = []
    for e, scores in zip(examples, per_example):
        rewards = torch.tensor([scores], dtype=torch.float64)
        margins = None if e.margins is None else torch.tensor([e.margins], dtype=torch.float64)
        losses.append(kwise_ranking_loss(rewards, scores=margins).item())
    agreement = ranking_agreement(per_example)
    metrics = {
        "eval_loss": float(np.mean(losses)),
        "eval_accuracy": agreement["pairwise_accuracy"],
        "eval_reward_mean": agreement["reward_mean"],
        "eval_reward_std": agreement["reward_std"],
        "eval_margin": agreement["margin"],
    }
    if "top1_accuracy" in agreement:
        metrics["eval_top1_accuracy"] = agreement["top1_accuracy"]
        metrics["eval_kendall_tau"] = agreement["kendall_tau"]
    return metrics, per_example


def plot_histogram(path: Path, groups: dict[str, list[float]], title: str) -> Path | None:
    """A PNG histogram of reward scores, one colour per group (e.g. best / worst responses); None when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    everything = [v for values in groups.values() for v in values]
    if not everything:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(everything), max(everything) + 1e-9, 40)
    for (label, values), color in zip(groups.items(), ("tab:green", "tab:red", "tab:gray", "tab:blue")):
        if values:
            ax.hist(values, bins=bins, alpha=0.5, label=f"{label} (n={len(values)})", color=color)
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- training


def load_reward_data(cfg: RewardConfig, tokenizer: Any, run: Run) -> tuple[list[RewardExample], list[RewardExample]]:
    """Load, hold out whole records (or read ``eval_data``), expand to pairs if asked, encode; every count
    printed."""
    load = dict(format=cfg.format, columns=parse_columns(cfg.columns), skip_invalid=cfg.skip_invalid,
                limit=cfg.limit or None)
    records, report = load_preferences(cfg.data, **load)
    run.print(report.summary())
    if cfg.eval_data:
        train_records = records
        eval_records, eval_report = load_preferences(cfg.eval_data, **load)
        run.print("eval: " + eval_report.summary())
    else:
        train_records, eval_records = split_by_record(records, cfg.eval_fraction, cfg.seed)
    train_records, eval_records, hygiene = check_hygiene(train_records, eval_records, dedupe=cfg.dedupe)
    run.print(hygiene.summary())
    if cfg.expand_pairs:  # the held-out set keeps its rankings, so both ways are measured alike
        train_records = expand_to_pairs(train_records)
    encode = dict(template=cfg.template, max_length=cfg.max_length, truncation=cfg.truncation,
                  skip_invalid=cfg.skip_invalid, margin=cfg.margin, margin_scale=cfg.margin_scale)
    train_set, train_report = encode_preferences(train_records, tokenizer, source=cfg.data, **encode)
    run.print("train: " + train_report.summary())
    eval_set, eval_encode_report = encode_preferences(eval_records, tokenizer, source=cfg.eval_data or cfg.data,
                                                      **encode)
    if eval_records:
        run.print("eval: " + eval_encode_report.summary())
    if not train_set:
        raise AlignlabError("no training examples left after encoding", file=cfg.data)
    return train_set, eval_set


def reward_step(model: torch.nn.Module, examples: list[RewardExample], mine: list[list[int]], global_prompts: int,
                global_responses: int, pad: int, layout: dict[str, Any], cfg: RewardConfig, run: Run,
                step: int) -> tuple[Counter[str], bool]:
    """Forward and backward this process's micro-batches of one optimizer step: the K-wise ranking loss (mean over
    the global batch's prompts) plus reward centring (mean over its responses). Returns the summed statistics
    and whether every loss was finite."""
    sums: Counter[str] = Counter()  # summed over micro-batches, then over processes
    ok = True
    for n, idx in enumerate(mine):
        batch = collate_rankings([examples[i] for i in idx], pad, shared=not run.shards_weights,
                                 layout=layout).to(run.device)
        with run.accumulate(model, last=n == len(mine) - 1):
            with run.accelerator.autocast():
                flat = ranking_rewards(model, batch)  # (n,)
            rewards = rewards_grid(flat, batch.mask)  # (b, k), best first
            ranking = kwise_ranking_loss(rewards, mask=batch.mask, scores=batch.margins).sum()
            centring = cfg.center_rewards_coef * (flat**2).sum()
            # means over the global batch (prompts; responses for centring); x world as DDP averages
            loss = (ranking / global_prompts + centring / global_responses) * run.world_size
            ok = run.check_finite(loss, step) and ok
            run.accelerator.backward(loss)
        sums.update(ranking=float(ranking.detach()), centring=float(centring.detach()),
                    tokens=batch.tokens, encoded_tokens=batch.encoded, **batch_sums(rewards.detach(), batch.mask))
    return sums, ok


def reward_metrics(sums: Counter[str], global_prompts: int, global_responses: int, cfg: RewardConfig,
                   run: Run) -> dict[str, Any]:
    """One step's statistics over every process's micro-batches."""
    total = {key: run.all_reduce_sum(value) for key, value in sums.items()}
    metrics: dict[str, Any] = {
        "loss": total["ranking"] / global_prompts + total["centring"] / global_responses,
        "ranking_loss": total["ranking"] / global_prompts,
        "accuracy": total["wins"] / max(1.0, total["pairs"]),
        "reward_mean": total["reward"] / global_responses,
        "margin": total["margin"] / global_prompts,
        "tokens": int(total["tokens"]),
        "encoded_tokens": int(total["encoded_tokens"]),
    }
    if cfg.center_rewards_coef:
        metrics["centring"] = total["centring"] / global_responses
    return metrics


def train_reward(cfg: RewardConfig) -> Path:
    """Train a reward model as configured; returns the run folder."""
    run = Run(cfg, "rm")
    if not cfg.data:
        raise AlignlabError("no training data: pass data=FILE (e.g. --data ../shared/data/oasst_en_100_tree.jsonl)",
                            field="data")
    tokenizer = prepare_reward_tokenizer(load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code))
    train_set, eval_set = load_reward_data(cfg, tokenizer, run)
    lengths = [len(e) for e in train_set]
    sizes = [e.encoded for e in train_set]

    # -- model, optimizer, plan -----------------------------------------------------------------------------
    model = prepare_policy(cfg, tokenizer, head="score")
    trainable, total = count_parameters(model)
    responses = sum(len(e.sequences) for e in train_set)
    run.print(f"reward model {cfg.model}: {trainable:,} trainable of {total:,} parameters; {len(train_set)} "
              f"train prompts ({responses} responses) / {len(eval_set)} eval prompts; {run.world_size} process(es)")
    plan = plan_steps(lengths, cfg, run.world_size)
    model, optimizer, scheduler, start, _ = run.prepare_training(model, len(plan))
    pad = tokenizer.pad_token_id
    layout = shared_prompt_layout(model)

    # -- the loop: step, log, evaluate, checkpoint -----------------------------------------------------------
    eval_scores: list[list[float]] | None = None
    bar = run.progress(len(plan), start)
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        global_prompts = len(plan[step])
        global_responses = sum(len(train_set[i].sequences) for i in plan[step])
        mine = micro_batches(plan[step], lengths, cfg, run.rank, run.world_size, sizes)
        sums, ok = reward_step(model, train_set, mine, global_prompts, global_responses, pad, layout, cfg, run, step)
        grad_norm = run.optimizer_step(model, optimizer, scheduler, step, finite_loss=ok)
        seconds = time.perf_counter() - t0
        metrics = reward_metrics(sums, global_prompts, global_responses, cfg, run)
        metrics.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], tokens_per_s=metrics["tokens"] / seconds,
                       s_per_step=seconds)
        if run.should_eval(step, len(plan)) and eval_set:
            eval_metrics, eval_scores = evaluate_reward(model, eval_set, pad, run, cfg.batch_size * 4)
            metrics.update(eval_metrics)
        if (step + 1) % cfg.log_every == 0 or "eval_loss" in metrics:
            run.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}", refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(step, len(plan), model, optimizer, scheduler)
    bar.close()

    # -- after training: held-out scores, reward statistics, final model --------------------------------------
    if eval_set and eval_scores is None:  # the run had already finished: evaluate the loaded weights
        eval_metrics, eval_scores = evaluate_reward(model, eval_set, pad, run, cfg.batch_size * 4)
        run.log(len(plan), eval_metrics)
    stats, train_scores = training_reward_stats(model, train_set, pad, run, cfg)
    if run.is_main:
        write_reward_reports(run.out, stats, train_scores, eval_set, eval_scores,
                             eval_metrics if eval_set and eval_scores is not None else None)
        run.print(_summary(stats, eval_metrics if eval_set and eval_scores is not None else None))
    return run.finish(model, tokenizer, extra_files={REWARD_STATS_FILE: json.dumps(stats, indent=2)})


def write_reward_reports(out: Path, stats: dict[str, Any], train_scores: list[float], eval_set: list[RewardExample],
                         eval_scores: list[list[float]] | None, eval_metrics: dict[str, float] | None) -> None:
    """``reward_stats.json``; with held-out scores ``eval_scores.jsonl`` and ``eval_stats.json``; and the
    histogram ``reward_hist.png`` (held-out best/worst/in between, else the training responses)."""
    with open(out / REWARD_STATS_FILE, "w") as f:
        json.dump(stats, f, indent=2)
    if eval_scores is None or eval_metrics is None:
        plot_histogram(out / "reward_hist.png", {"training responses": train_scores},
                       f"training rewards ({len(train_scores)} responses)")
        return
    best = [s[0] for s in eval_scores]
    worst = [s[-1] for s in eval_scores]
    middle = [v for s in eval_scores for v in s[1:-1]]
    write_eval_scores(out / "eval_scores.jsonl", eval_set, eval_scores)
    with open(out / "eval_stats.json", "w") as f:
        json.dump({**eval_metrics, "prompts": len(eval_set), "scores": reward_stats(best + worst + middle),
                   "best": reward_stats(best), "worst": reward_stats(worst)}, f, indent=2)
    plot_histogram(out / "reward_hist.png", {"best (chosen)": best, "worst (rejected)": worst, "in between": middle},
                   f"held-out rewards ({len(eval_set)} prompts)")


def training_reward_stats(model: torch.nn.Module, train_set: list[RewardExample], pad_token_id: int, run: Run,
                          cfg: RewardConfig) -> tuple[dict[str, Any], list[float]]:
    """Mean, std and quantiles of the trained model's scores on the training responses (a seeded sample of
    ``stats_samples`` of them when there are more), with the encoding the model was trained with; and the
    scores. In fp32 (:func:`full_precision`), so the statistics fit what a reloaded scorer returns."""
    from accelerate.utils import gather_object

    sequences = [s for e in train_set for s in e.sequences]
    chosen = list(range(len(sequences)))
    if 0 < cfg.stats_samples < len(sequences):
        chosen = sorted(np.random.default_rng(cfg.seed).choice(len(sequences), cfg.stats_samples,
                                                               replace=False).tolist())
    mine = chosen[run.rank :: run.world_size]
    with full_precision(run, model):
        scores = score_sequences(model, [sequences[i] for i in mine], pad_token_id,
                                 batch_size=cfg.batch_size * 4, device=run.device)
    if run.world_size > 1:
        scores = gather_object(scores)
    templates = {resolve_template(cfg.template, e.prompt) for e in train_set}
    stats = reward_stats(scores)
    stats["computed_on"] = f"{len(chosen)} training responses, scored by the final model"
    stats["encoding"] = {
        "template": templates.pop() if len(templates) == 1 else "auto",
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
    }
    return stats, scores


def write_eval_scores(path: Path, examples: list[RewardExample], scores: list[list[float]]) -> None:
    """One JSON line per held-out prompt: ``{record, prompt, responses, rewards}``, responses best first (so
    the file is itself ranking data: ``alignlab rm score --data eval_scores.jsonl`` re-scores it)."""
    with open(path, "w", encoding="utf-8") as f:
        for e, s in zip(examples, scores):
            line = {"record": e.record, "prompt": e.prompt, "responses": e.responses, "rewards": s}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def _summary(stats: dict[str, Any], eval_metrics: dict[str, float] | None) -> str:
    text = (f"reward stats on training responses: mean {stats['mean']:.4f}, std {stats['std']:.4f} "
            f"(n={stats['count']})")
    if eval_metrics:
        text += f"\nheld-out: pairwise accuracy {eval_metrics['eval_accuracy']:.4f}"
        if "eval_top1_accuracy" in eval_metrics:
            text += (f", top-1 accuracy {eval_metrics['eval_top1_accuracy']:.4f}, "
                     f"Kendall tau {eval_metrics['eval_kendall_tau']:.4f}")
        text += f", loss {eval_metrics['eval_loss']:.4f}"
    return text
