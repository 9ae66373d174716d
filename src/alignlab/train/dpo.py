"""Preference optimisation: the DPO family (DPO, cDPO, robust DPO, IPO, hinge, SimPO, ORPO) on pairs, and KTO on
unpaired feedback.

The loop, top to bottom: load pairs (a ranking becomes all its pairs) -> tokenize each pair with an exact
prompt/response boundary and apply the length policy (every cut and drop counted) -> load the policy (+LoRA)
-> set up the reference -> plan every optimizer step (a ranking's pairs stay together: ``group_rankings``) ->
for each step: this process's micro-batches, chosen and rejected in ONE forward (each prompt encoded once, its
responses after it; a ranking's K answers once for its K(K-1)/2 pairs), log-probs of the response
tokens only, the reference's log-probs of the same rows, the loss (mean over the pairs of the global batch,
plus an optional NLL term per chosen token), backward, clip, step -> log rewards, margins, accuracies and KL
to the reference, evaluate, checkpoint -> save the final model.

The examples and their tokenization are in :mod:`alignlab.train.preference_examples`; the reference's
log-probs and their cache in :mod:`alignlab.train.reference`.

Where the reference log-probs come from (:class:`Reference`):

- a frozen copy of the starting model (or of ``reference=``), in memory next to the policy;
- with LoRA and no ``reference=``: the policy itself with its adapter disabled, i.e. the base weights; no
  second model in memory;
- with ``precompute_ref``: a table computed once before training and cached on disk (safetensors) under a key
  made of the reference weights' file checksums, the compute precision and the token ids of every sequence
  scored (which is what the data file contents and the tokenization settings determine); a run that changes
  any of them computes a new table, a run that changes none reuses it without loading a reference;
- none for the reference-free losses (SimPO, ORPO).

KTO takes its reference point ``z0`` (the KL of the policy from the reference) from mismatched pairs within each
micro-batch, as TRL does: row ``j`` keeps its prompt and takes the completion of row ``j - 1``.

Dropout is switched off in the policy (as TRL does by default) so that the policy and the reference score a
sequence the same way at step 0 and the implicit rewards carry no dropout noise.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignlab.config import DPOConfig
from alignlab.errors import AlignlabError
from alignlab.losses.dpo import kto_kl_reference_point, kto_loss, preference_loss, rpo_sft_term
from alignlab.models import (
    cache_dir,
    count_parameters,
    disable_dropout,
    load_frozen_reference,
    load_tokenizer,
    resolve_precision,
)
from alignlab.train.loop import Run, micro_batches, plan_steps
from alignlab.train.policy import prepare_policy
from alignlab.train.preference_examples import (
    PROMPT_TOO_LONG,
    SAME_AFTER_TRUNCATION,
    FeedbackExample,
    PairExample,
    distinct_rows,
    encode_pair,
    fit_lengths,
    kl_rows,
    load_examples,
    pair_rows,
    prepare_feedback,
    prepare_pairs,
    ranking_units,
    sequence_row,
    unit_tokens,
    unpair,
)
from alignlab.train.reference import (
    Reference,
    Row,
    compute_reference_table,
    read_reference_cache,
    reference_cache_path,
    reference_fingerprint,
    row_digest,
    score_rows,
    state_dict_fingerprint,
    write_reference_cache,
)

__all__ = [
    "FeedbackExample",
    "PROMPT_TOO_LONG",
    "PairExample",
    "Reference",
    "SAME_AFTER_TRUNCATION",
    "default_beta",
    "distinct_rows",
    "encode_pair",
    "feedback_terms",
    "fit_lengths",
    "kl_rows",
    "pair_rows",
    "pair_terms",
    "prepare_feedback",
    "prepare_pairs",
    "ranking_units",
    "reference_cache_path",
    "reference_fingerprint",
    "row_digest",
    "train_dpo",
    "unit_tokens",
    "unpair",
]

REFERENCE_FREE = ("simpo", "orpo")



# --------------------------------------------------------------------------------------------- the losses


def default_beta(cfg: DPOConfig) -> float:
    """``cfg.beta``, or the loss's usual value when it is 0: 2.0 for SimPO, 0.1 for the others."""
    if cfg.beta > 0:
        return cfg.beta
    return 2.0 if cfg.loss == "simpo" else 0.1


def sft_weight(cfg: DPOConfig) -> float:
    """Weight of the NLL term on the chosen responses: ``rpo_alpha``, or 1 for ORPO and 0 otherwise."""
    if cfg.rpo_alpha is not None:
        return cfg.rpo_alpha
    return 1.0 if cfg.loss == "orpo" else 0.0


def pair_terms(cfg: DPOConfig, model: torch.nn.Module, pairs: Sequence[PairExample], reference: Reference | None,
               pad: int, run: Run) -> dict[str, Any]:
    """Score ``b`` pairs in one forward of at most ``2b`` rows (an answer shared by several pairs, as in a
    ranking, is scored once) and compute their losses.

    Returns a dict of ``(b,)`` tensors: ``losses``, ``chosen_rewards``, ``rejected_rewards``, ``policy_chosen``,
    ``policy_rejected`` (summed log-probs), ``reference_chosen``/``reference_rejected`` (None without a
    reference), ``chosen_lengths``; ``chosen_token_logps`` and ``chosen_mask`` ``(b, k)`` for the NLL term;
    ``tokens`` (int).
    """
    rows, inverse = distinct_rows(pair_rows(pairs))
    token_logps, mask, tokens, encoded = score_rows(model, rows, pad, run)
    reference_logps = reference.logps(rows, pad, run) if reference is not None else None
    if len(rows) < len(inverse):  # answers shared by several pairs were scored once
        back = torch.tensor(inverse, device=token_logps.device)
        token_logps, mask = token_logps[back], mask[back]
        reference_logps = reference_logps[back] if reference_logps is not None else None
    logps, lengths = token_logps.sum(-1), mask.sum(-1)
    b = len(pairs)
    reference_chosen = reference_rejected = None
    if reference_logps is not None:
        reference_chosen, reference_rejected = reference_logps[:b], reference_logps[b:]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss, logps[:b], logps[b:], reference_chosen, reference_rejected, lengths[:b], lengths[b:],
        beta=default_beta(cfg), label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
    )
    return {
        "losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
        "policy_chosen": logps[:b], "policy_rejected": logps[b:], "reference_chosen": reference_chosen,
        "reference_rejected": reference_rejected, "chosen_lengths": lengths[:b],
        "chosen_token_logps": token_logps[:b], "chosen_mask": mask[:b], "tokens": tokens,
        "encoded_tokens": encoded,
    }


def feedback_terms(cfg: DPOConfig, model: torch.nn.Module, examples: Sequence[FeedbackExample],
                   reference: Reference, pad: int, run: Run, *, sync: bool = True) -> dict[str, Any]:
    """KTO on ``b`` examples: the matched rows (with gradient), the mismatched KL rows (no gradient) for the
    reference point ``z0``, and the losses (desirable first). Returns tensors as :func:`pair_terms` with
    ``policy_chosen``/``policy_rejected`` the desirable/undesirable examples, plus ``kl_reference_point``.
    With ``sync`` (training) ``z0`` is averaged over processes, which then must all call this together."""
    rows = [sequence_row(e.prompt_ids, e.completion_ids) for e in examples]
    token_logps, mask, tokens, encoded = score_rows(model, rows, pad, run)
    logps, lengths = token_logps.sum(-1), mask.sum(-1)
    mismatched = kl_rows(examples, cfg.max_length)
    with torch.no_grad():
        kl_scored = score_rows(model, mismatched, pad, run)
    policy_kl = kl_scored.token_logps.sum(-1)
    z0 = kto_kl_reference_point(policy_kl, reference.logps(mismatched, pad, run))
    if sync and run.world_size > 1:  # TRL averages the estimate over processes
        z0 = torch.as_tensor(run.gather_mean(float(z0)), device=run.device)
    reference_logps = reference.logps(rows, pad, run)
    desirable = torch.tensor([e.label for e in examples], device=run.device)
    losses, chosen_rewards, rejected_rewards = kto_loss(
        logps[desirable], logps[~desirable], reference_logps[desirable], reference_logps[~desirable], z0,
        beta=default_beta(cfg), desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
    )
    return {
        "losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
        "policy_chosen": logps[desirable], "policy_rejected": logps[~desirable],
        "reference_chosen": reference_logps[desirable], "reference_rejected": reference_logps[~desirable],
        "chosen_lengths": lengths[desirable], "chosen_token_logps": token_logps[desirable],
        "chosen_mask": mask[desirable], "kl_reference_point": float(z0),
        "tokens": tokens + kl_scored.tokens, "encoded_tokens": encoded + kl_scored.encoded,
    }


def add_to_sums(sums: Counter, terms: dict[str, Any], nll_weight: float) -> None:
    """Accumulate what the metrics need (sums over examples, so micro-batches and processes add up)."""
    n_chosen, n_rejected = len(terms["policy_chosen"]), len(terms["policy_rejected"])
    sums["examples"] += len(terms["losses"])
    sums["preference_loss"] += float(terms["losses"].detach().sum())
    sums["n_chosen"] += n_chosen
    sums["n_rejected"] += n_rejected
    sums["rewards/chosen"] += float(terms["chosen_rewards"].sum())
    sums["rewards/rejected"] += float(terms["rejected_rewards"].sum())
    sums["logps/chosen"] += float(terms["policy_chosen"].detach().sum())
    sums["logps/rejected"] += float(terms["policy_rejected"].detach().sum())
    sums["chosen_tokens"] += float(terms["chosen_lengths"].sum())
    if "kl_reference_point" not in terms:  # pairs (KTO has no pairs to be right or wrong about)
        sums["rewards/accuracies"] += float((terms["chosen_rewards"] > terms["rejected_rewards"]).float().sum())
    if terms["reference_chosen"] is not None:
        sums["kl"] += float((terms["policy_chosen"].detach() - terms["reference_chosen"]).sum())
    if nll_weight:
        sums["nll"] += -float((terms["chosen_token_logps"].detach() * terms["chosen_mask"]).sum())
    if "kl_reference_point" in terms:
        sums["kl_reference_point"] += terms["kl_reference_point"]
        sums["micro_batches"] += 1
    sums["tokens"] += terms["tokens"]
    sums["encoded_tokens"] += terms["encoded_tokens"]


def summarize(sums: Counter, run: Run, cfg: DPOConfig) -> dict[str, float]:
    """Metrics from the sums of every process: means over examples (chosen/rejected separately for KTO), KL per
    sequence and per token, the loss as the objective (preference loss + weight x NLL per chosen token)."""
    keys = sorted(sums)
    totals = dict(zip(keys, (run.all_reduce_sum(sums[k]) for k in keys)))
    n, n_chosen, n_rejected = totals["examples"], totals["n_chosen"], totals["n_rejected"]
    chosen_tokens = max(totals["chosen_tokens"], 1)
    nll_weight = sft_weight(cfg)
    out = {"loss": totals["preference_loss"] / max(n, 1) + nll_weight * totals.get("nll", 0.0) / chosen_tokens}
    if nll_weight:
        out["preference_loss"] = totals["preference_loss"] / max(n, 1)
        out["nll"] = totals["nll"] / chosen_tokens
    # a KTO batch may hold only one kind: its means are then left out, not reported as 0
    if n_chosen:
        out["rewards/chosen"] = totals["rewards/chosen"] / n_chosen
    if n_rejected:
        out["rewards/rejected"] = totals["rewards/rejected"] / n_rejected
    if n_chosen and n_rejected:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if cfg.loss != "kto":
        out["rewards/accuracies"] = totals["rewards/accuracies"] / n_chosen
    if n_chosen:
        out["logps/chosen"] = totals["logps/chosen"] / n_chosen
    if n_rejected:
        out["logps/rejected"] = totals["logps/rejected"] / n_rejected
    if "kl" in totals and n_chosen:
        out["kl"] = totals["kl"] / n_chosen
        out["kl_per_token"] = totals["kl"] / chosen_tokens
    if "kl_reference_point" in totals:
        out["kl_reference_point"] = totals["kl_reference_point"] / max(totals["micro_batches"], 1)
    return out


def eval_chunks(examples: Sequence[Any], batch_size: int, units: Sequence[Sequence[int]] | None = None
                ) -> list[list[Any]]:
    """Held-out examples sorted by length and cut into batches of ``batch_size`` units (``units``: lists of
    example indices, e.g. a ranking's pairs; default every example on its own). Deterministic, so KTO's eval
    KL rows are too."""
    units = units if units is not None else [[i] for i in range(len(examples))]
    order = sorted(range(len(units)), key=lambda u: (max(len(examples[i]) for i in units[u]), u))
    return [[examples[i] for u in order[s : s + batch_size] for i in units[u]]
            for s in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate_preferences(cfg: DPOConfig, model: torch.nn.Module, examples: Sequence[Any],
                         reference: Reference | None, pad: int, run: Run) -> dict[str, float]:
    """The training metrics on held-out examples (this process's share; summed over processes), ``eval_``."""
    model.eval()
    sums: Counter = Counter()
    units = ranking_units(examples, cfg.group_rankings and cfg.loss != "kto")  # batched as in training
    for chunk in eval_chunks(examples, cfg.batch_size, units[run.rank :: run.world_size]):
        if cfg.loss == "kto":
            # processes may hold different numbers of eval batches: each keeps its own z0 estimate
            terms = feedback_terms(cfg, model, chunk, reference, pad, run, sync=False)
        else:
            terms = pair_terms(cfg, model, chunk, reference, pad, run)
        add_to_sums(sums, terms, sft_weight(cfg))
    model.train()
    sums.pop("tokens", None)
    sums.pop("encoded_tokens", None)
    return {f"eval_{k}": v for k, v in summarize(sums, run, cfg).items()}


# --------------------------------------------------------------------------------------------- reference


def rows_to_score(cfg: DPOConfig, train_set: Sequence[Any], eval_set: Sequence[Any], plan: list[list[int]],
                  lengths: Sequence[int], world_size: int) -> list[Row]:
    """Every sequence the reference will be asked about during the run (train and eval; for KTO also the KL rows
    of every micro-batch of the plan, on every process)."""
    if cfg.loss != "kto":
        return pair_rows(list(train_set) + list(eval_set))
    rows = [sequence_row(e.prompt_ids, e.completion_ids) for e in [*train_set, *eval_set]]
    for step in plan:
        for rank in range(world_size):
            for idx in micro_batches(step, lengths, cfg, rank, world_size, max_tokens=0):  # as train_dpo (KTO)
                rows += kl_rows([train_set[i] for i in idx], cfg.max_length)
    for rank in range(world_size):
        for chunk in eval_chunks(list(eval_set)[rank::world_size], cfg.batch_size):
            rows += kl_rows(chunk, cfg.max_length)
    return rows


def setup_reference(cfg: DPOConfig, model: torch.nn.Module, tokenizer: Any, run: Run, train_set: list,
                    eval_set: list, plan: list[list[int]], lengths: list[int]) -> Reference | None:
    """The reference for this run (see the module docstring); must run before the policy is trained or
    resumed, since with ``precompute_ref`` and no LoRA the untouched policy scores the data itself."""
    if cfg.loss in REFERENCE_FREE:
        if cfg.reference or cfg.precompute_ref:
            run.print(f"note: loss '{cfg.loss}' is reference-free; reference/precompute_ref are ignored")
        return None
    name = cfg.reference or cfg.model
    adapter_off = cfg.lora and not cfg.reference
    if not cfg.precompute_ref:
        if adapter_off:
            run.print("reference: the base weights (LoRA adapter disabled)")
            return Reference(adapter_of=model)
        run.print(f"reference: a frozen copy of {name}")
        return Reference(model=load_frozen_reference(name, cfg, tokenizer, run.device))

    pad = tokenizer.pad_token_id
    rows = rows_to_score(cfg, train_set, eval_set, plan, lengths, run.world_size)
    digests = [row_digest(*row) for row in rows]
    frozen = None
    fingerprint = reference_fingerprint(name)
    if fingerprint is None:  # a hub id: hash the weights themselves
        frozen = load_frozen_reference(name, cfg, tokenizer, run.device)
        fingerprint = state_dict_fingerprint(frozen)
    root = Path(cfg.ref_cache_dir) if cfg.ref_cache_dir else cache_dir() / "ref-logps"
    precision = resolve_precision(cfg.precision)
    path = reference_cache_path(root, fingerprint, precision, digests)
    table = read_reference_cache(path, digests)
    if table is not None:
        run.print(f"reference log-probs: reused {path} ({len(table)} sequences)")
        return Reference(table=table)
    if adapter_off:
        scorer = Reference(adapter_of=model)
    elif not cfg.reference:  # the policy has not been trained yet: it is the reference
        scorer = Reference(model=model)
    else:
        scorer = Reference(model=frozen or load_frozen_reference(name, cfg, tokenizer, run.device))
    was_training = model.training
    model.eval()
    table = compute_reference_table(scorer, rows, pad, run, 2 * cfg.batch_size)
    model.train(was_training)
    del scorer, frozen
    if run.is_main:
        write_reference_cache(path, table, {"reference": str(name), "fingerprint": fingerprint,
                                            "precision": precision, "sequences": str(len(table))})
    run.accelerator.wait_for_everyone()
    run.print(f"reference log-probs: computed {len(table)} sequences, cached in {path}")
    return Reference(table=table)


# --------------------------------------------------------------------------------------------- the trainer


def check_config(cfg: DPOConfig) -> None:
    """Refuse settings that cannot work, before any model is loaded."""
    if not cfg.data:
        raise AlignlabError("no training data: pass data=FILE (e.g. --data ../shared/data/dpo_en_demo.json)",
                            field="data")
    if cfg.loss == "cdpo" and cfg.label_smoothing <= 0:
        raise AlignlabError("cdpo needs label_smoothing > 0 (with 0 it is plain dpo)", field="label_smoothing")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise AlignlabError(f"must lie in [0, 0.5), got {cfg.label_smoothing}", field="label_smoothing")
    if cfg.loss == "kto" and cfg.batch_size < 2:
        raise AlignlabError("kto needs batch_size >= 2: its KL reference point comes from mismatched pairs within "
                            "a micro-batch", field="batch_size")
    if cfg.max_prompt_length < 0 or cfg.max_length < 2:
        raise AlignlabError("max_length must be at least 2 and max_prompt_length non-negative", field="max_length")


def train_dpo(cfg: DPOConfig) -> Path:
    """Run preference optimisation as configured; returns the run folder."""
    check_config(cfg)
    run = Run(cfg, "dpo")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    pad = tokenizer.pad_token_id
    kto = cfg.loss == "kto"
    nll_weight = sft_weight(cfg)

    # -- data -----------------------------------------------------------------------------------------
    train_set, eval_set = load_examples(cfg.data, tokenizer, cfg, run)
    # the plan is made of units: single examples, or with group_rankings each ranking's pairs together
    units = ranking_units(train_set, cfg.group_rankings and not kto)
    lengths = [max(len(train_set[i]) for i in unit) for unit in units]
    # KTO's KL reference point is a mean over each micro-batch's mismatched rows: its micro-batches stay whole
    sizes = None if kto else [unit_tokens([train_set[i] for i in unit]) for unit in units]
    max_tokens = 0 if kto else cfg.max_tokens
    plan = plan_steps(lengths, cfg, run.world_size)

    def examples_of(unit_indices: Sequence[int]) -> list[int]:
        return [i for u in unit_indices for i in units[u]]

    # -- policy, reference, optimizer -----------------------------------------------------------------
    model = prepare_policy(cfg, tokenizer)
    disable_dropout(model)
    model.to(run.device)
    reference = setup_reference(cfg, model, tokenizer, run, train_set, eval_set, plan, lengths)
    trainable, total = count_parameters(model)
    run.print(f"model {cfg.model}: {trainable:,} trainable of {total:,} parameters; loss {cfg.loss} "
              f"(beta {default_beta(cfg)}{f', nll weight {nll_weight}' if nll_weight else ''}); "
              f"{len(train_set)} train{f' (in {len(units)} rankings)' if len(units) < len(train_set) else ''} / "
              f"{len(eval_set)} eval {'examples' if kto else 'pairs'}; "
              f"{len(plan)} steps; {run.world_size} process(es)")
    model, optimizer, scheduler, start, _ = run.prepare_training(model, len(plan))
    if reference is not None and reference.adapter_of is not None:
        reference.adapter_of = model

    # -- the loop ---------------------------------------------------------------------------------------
    bar = run.progress(len(plan), start)
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        global_indices = examples_of(plan[step])
        global_examples = len(global_indices)
        # the NLL term is a mean over the chosen (desirable) tokens of the whole global batch
        global_chosen_tokens = sum(len(train_set[i].completion_ids if kto else train_set[i].chosen_ids)
                                   for i in global_indices if not kto or train_set[i].label)
        mine = [examples_of(u) for u in micro_batches(plan[step], lengths, cfg, run.rank, run.world_size, sizes,
                                                      max_tokens)]
        sums: Counter = Counter()
        ok = True
        for k, idx in enumerate(mine):
            chunk = [train_set[i] for i in idx]
            with run.accumulate(model, last=k == len(mine) - 1):
                if kto:
                    terms = feedback_terms(cfg, model, chunk, reference, pad, run)
                else:
                    terms = pair_terms(cfg, model, chunk, reference, pad, run)
                # mean over the global batch's examples; x world because DDP averages gradients
                loss = terms["losses"].sum() / global_examples * run.world_size
                if nll_weight:
                    loss = loss + run.world_size * rpo_sft_term(terms["chosen_token_logps"], terms["chosen_mask"],
                                                                nll_weight, num_items=max(global_chosen_tokens, 1))
                ok = run.check_finite(loss, step) and ok
                run.accelerator.backward(loss)
            add_to_sums(sums, terms, nll_weight)
        grad_norm = run.optimizer_step(model, optimizer, scheduler, step, finite_loss=ok)

        # -- log, evaluate, checkpoint ------------------------------------------------------------------
        seconds = time.perf_counter() - t0
        tokens = run.all_reduce_sum(sums.pop("tokens"))
        encoded = run.all_reduce_sum(sums.pop("encoded_tokens"))
        metrics: dict[str, Any] = summarize(sums, run, cfg)
        metrics.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], tokens=int(tokens),
                       encoded_tokens=int(encoded),
                       tokens_per_s=tokens / seconds, s_per_step=seconds)
        if run.should_eval(step, len(plan)) and eval_set:
            metrics.update(evaluate_preferences(cfg, model, eval_set, reference, pad, run))
        if (step + 1) % cfg.log_every == 0 or "eval_loss" in metrics:
            run.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics.get('rewards/margins', 0.0):.3f}",
                        refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(step, len(plan), model, optimizer, scheduler)

    return run.finish(model, tokenizer)
