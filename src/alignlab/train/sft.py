"""Supervised fine-tuning: maximise the likelihood of the responses (loss on response tokens only).

The loop, top to bottom: load data -> load model (+LoRA) -> plan every optimizer step -> for each step:
take this process's micro-batches, sum the token NLL, divide by the global batch's loss-token count (so
accumulation and multiple processes give exactly the gradient of one big batch), backward, clip, step ->
log, evaluate, checkpoint -> save the final model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlab.config import SFTConfig, parse_columns
from alignlab.data.formats import load_sft_dataset
from alignlab.data.hygiene import check_hygiene
from alignlab.data.tokenize import IGNORE_INDEX, SHARED_PREFIX_MIN, TokenizedExample
from alignlab.models import count_parameters, load_tokenizer
from alignlab.train.forward import (
    collate_aligned,
    collate_right,
    loss_free_prefix_length,
    loss_rows_cross_entropy,
    shared_prefix_cross_entropy,
    sum_token_cross_entropy,
    use_segment_attention,
)
from alignlab.train.loop import Run, micro_batches, plan_steps
from alignlab.train.policy import prepare_policy, split_eval


def token_nll(model: torch.nn.Module, chunk: list[TokenizedExample], pad_token_id: int, run: Run) -> tuple[
        torch.Tensor, int]:
    """The summed NLL of a micro-batch's loss tokens and its non-pad token count.

    The LM head runs on the loss positions only (right-padded rows, hidden states gathered first); under
    engines that shard the head's weight between calls (FSDP, DeepSpeed) the aligned layout gets the same
    sum through the model's own ``logits_to_keep`` instead. A template's preamble that every example of the
    micro-batch starts with is encoded once (:func:`shared_prefix_cross_entropy`) where the model runs
    segment attention."""
    seqs, labels = [e.input_ids for e in chunk], [e.labels for e in chunk]
    if run.shards_weights:
        batch = collate_aligned(seqs, labels, pad_token_id).to(run.device)
        return sum_token_cross_entropy(model, batch), int(batch.attention_mask.sum())
    shared = loss_free_prefix_length(seqs, labels) if len(chunk) > 1 else 0
    if shared >= SHARED_PREFIX_MIN and use_segment_attention(model):
        nll = shared_prefix_cross_entropy(model, seqs, labels, shared, pad_token_id, run.device)
        return nll, sum(len(s) for s in seqs)
    padded = collate_right(seqs, labels, pad_token_id).to(run.device)
    return loss_rows_cross_entropy(model, padded), int(padded.attention_mask.sum())


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, examples: list[TokenizedExample], pad_token_id: int, run: Run,
                 batch_size: int) -> dict[str, float]:
    """Token-mean NLL and perplexity over ``examples`` (this process's share, summed over processes)."""
    model.eval()
    mine = examples[run.rank :: run.world_size]
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(mine)), key=lambda i: len(mine[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [mine[i] for i in order[start : start + batch_size]]
        with run.accelerator.autocast():
            total_nll += float(token_nll(model, chunk, pad_token_id, run)[0])
        total_tokens += sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in chunk)
    model.train()
    nll = run.all_reduce_sum(total_nll) / max(1.0, run.all_reduce_sum(total_tokens))
    return {"eval_loss": nll, "eval_ppl": math.exp(min(nll, 50.0))}


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the run folder."""
    run = Run(cfg, "sft")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not cfg.data:
        from alignlab.errors import AlignlabError

        raise AlignlabError("no training data: pass data=FILE (e.g. --data ../shared/data/alpaca_en_demo.json)",
                            field="data")

    # -- data -----------------------------------------------------------------------------------------
    load = dict(format=cfg.format, template=cfg.template, columns=parse_columns(cfg.columns),
                max_length=cfg.max_length, truncation=cfg.truncation, skip_invalid=cfg.skip_invalid,
                limit=cfg.limit or None)
    examples, report = load_sft_dataset(cfg.data, tokenizer, **load)
    run.print(report.summary())
    if cfg.eval_data:
        train_set = examples
        eval_set, eval_report = load_sft_dataset(cfg.eval_data, tokenizer, **load)
        run.print("eval: " + eval_report.summary())
    else:
        train_set, eval_set = split_eval(examples, cfg.eval_fraction, cfg.seed)
    train_set, eval_set, hygiene = check_hygiene(train_set, eval_set, dedupe=cfg.dedupe)
    run.print(hygiene.summary())
    lengths = [len(e.input_ids) for e in train_set]

    # -- model, optimizer, plan -----------------------------------------------------------------------
    model = prepare_policy(cfg, tokenizer)
    trainable, total = count_parameters(model)
    run.print(f"model {cfg.model}: {trainable:,} trainable of {total:,} parameters; "
              f"{len(train_set)} train / {len(eval_set)} eval examples; {run.world_size} process(es)")
    plan = plan_steps(lengths, cfg, run.world_size)
    model, optimizer, scheduler, start, _ = run.prepare_training(model, len(plan))
    pad = tokenizer.pad_token_id

    # -- the loop ---------------------------------------------------------------------------------------
    bar = run.progress(len(plan), start)
    for step in range(start, len(plan)):
        t0 = time.perf_counter()
        global_loss_tokens = sum(int(np.count_nonzero(np.asarray(train_set[i].labels) != IGNORE_INDEX))
                                 for i in plan[step])
        mine = micro_batches(plan[step], lengths, cfg, run.rank, run.world_size)
        step_nll, step_tokens = 0.0, 0
        ok = True
        for k, idx in enumerate(mine):
            with run.accumulate(model, last=k == len(mine) - 1):
                with run.accelerator.autocast():
                    nll, tokens = token_nll(model, [train_set[i] for i in idx], pad, run)
                # mean over the global batch's loss tokens; x world because DDP averages gradients
                loss = nll / global_loss_tokens * run.world_size
                ok = run.check_finite(loss, step) and ok
                run.accelerator.backward(loss)
            step_nll += float(nll.detach())
            step_tokens += tokens
        grad_norm = run.optimizer_step(model, optimizer, scheduler, step, finite_loss=ok)

        # -- log, evaluate, checkpoint ------------------------------------------------------------------
        seconds = time.perf_counter() - t0
        tokens = run.all_reduce_sum(step_tokens)
        metrics: dict[str, Any] = {
            "loss": run.all_reduce_sum(step_nll) / global_loss_tokens,
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
            "tokens": int(tokens),
            "tokens_per_s": tokens / seconds,
            "s_per_step": seconds,
        }
        if run.should_eval(step, len(plan)) and eval_set:
            metrics.update(evaluate_nll(model, eval_set, pad, run, cfg.batch_size))
        if (step + 1) % cfg.log_every == 0 or "eval_loss" in metrics:
            run.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        bar.update(1)
        run.checkpoint_or_stop(step, len(plan), model, optimizer, scheduler)

    return run.finish(model, tokenizer)
