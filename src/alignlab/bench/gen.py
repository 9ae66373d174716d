"""``bench gen``: sampling as the lab samples, our shared prefill (a common preamble and repeated prompts encoded
once per batch) against plain Hugging Face ``generate`` on the same prompts and seeds."""

from __future__ import annotations

import time
from typing import Any

from alignlab.bench.measure import meta_params
from alignlab.bench.registry import BenchSpec
from alignlab.bench.runners import raw_result
from alignlab.bench.worker import stamp_progress


def _ours_gen(spec: BenchSpec, share_prefix: bool) -> dict[str, Any]:
    """``bench gen``: ``generate_from_ids`` as the lab's sampling stages call it. Prompts: the task's training
    prompts rendered with the Alpaca template (``--data task:NAME``, or a prompts file replacing the sentiment
    task's), each repeated ``samples_per_prompt`` times in a row, cycled to fill ``--batch-size`` x steps
    sequences; one timed step per ``generate`` call, each with its own seed, the same for both runners (so they
    draw the same answers up to float rounding). fp32 weights, or bf16 weights when the precision is bf16 (as
    the lab loads a model it only samples from)."""
    import dataclasses as dc

    import torch

    from alignlab.data.templates import render_alpaca_prompt
    from alignlab.data.tokenize import encode_prompt, shared_prefix_length
    from alignlab.generation import SamplingConfig, generate_from_ids
    from alignlab.models import load_model, load_tokenizer
    from alignlab.tasks import load_task

    if spec.data.startswith("task:"):
        task = load_task(spec.data[len("task:"):], seed=spec.seed)
    else:
        task = load_task("sentiment", prompts_file=spec.data, seed=spec.seed)
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, dtype=torch.bfloat16 if spec.precision == "bf16" else torch.float32)
    ids = [encode_prompt(tokenizer, render_alpaca_prompt(task.instruction, p), template="none")
           for p in task.train_prompts]
    k, b = spec.option("samples_per_prompt"), spec.batch_size
    flat = [ids[(j // k) % len(ids)] for j in range(spec.total_steps * b)]
    sampling = SamplingConfig(max_new_tokens=spec.option("max_new_tokens"), temperature=1.0, batch_size=b,
                              share_prefix=share_prefix)
    seconds, cpu_seconds, tokens, shared = [], [], [], []
    stamp_progress("start")
    for step in range(spec.total_steps):
        chunk = flat[step * b : (step + 1) * b]
        wall, cpu = time.perf_counter(), time.process_time()
        samples = generate_from_ids(model, tokenizer, chunk, dc.replace(sampling, seed=spec.seed + step))
        seconds.append(time.perf_counter() - wall)
        stamp_progress("step")
        cpu_seconds.append(time.process_time() - cpu)
        tokens.append(sum(len(x.response_ids) for x in samples))
        shared.append(shared_prefix_length(chunk))
    timed = spec.warmup_steps
    return raw_result(
        seconds, cpu_seconds, tokens, [], params=meta_params(spec.model), precision=spec.precision,
        flops_per_token_factor=0,
        settings={"share_prefix": share_prefix, "batch_size": b, "samples_per_prompt": k,
                  "max_new_tokens": sampling.max_new_tokens, "temperature": 1.0, "prompts": len(ids)},
        reported={"prompt_tokens": sum(len(x) for x in flat[timed * b :]) / max(1, len(flat) - timed * b),
                  "common_prefix_tokens": sum(shared[timed:]) / max(1, len(shared) - timed) if share_prefix else 0.0},
    )


def ours_gen_shared(spec: BenchSpec) -> dict[str, Any]:
    """``bench gen`` with the shared prefill (:func:`alignlab.generation._shared_prefill`)."""
    return _ours_gen(spec, share_prefix=True)


def ours_gen_plain(spec: BenchSpec) -> dict[str, Any]:
    """``bench gen`` with every prompt encoded whole, as plain ``model.generate`` on a left-padded batch does."""
    return _ours_gen(spec, share_prefix=False)
