"""One sampler for every stage that generates (``generate``, PPO, rejection sampling, best-of-n, the lab).

Backend: Hugging Face ``generate`` with its KV cache, prompts left-padded so a batch decodes together.
Responses are cut at the first EOS (kept, and the sample marked finished) or at the first stop string;
a response that hits ``max_new_tokens`` first is marked unfinished, so PPO can penalise it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlab.data.tokenize import encode_prompt


@dataclass
class SamplingConfig:
    """How to sample. ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """One generated response. ``response_ids`` ends with EOS when ``finished`` by EOS."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool


def cut_response(ids: Sequence[int], eos_token_id: int | Sequence[int], pad_token_id: int | None, tokenizer: Any,
                 stop_strings: Sequence[str] = ()) -> tuple[list[int], bool]:
    """Cut generated ids at the first EOS (kept) or the first completed stop string; drop padding.
    Returns (ids, finished)."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    out: list[int] = []
    for t in ids:
        t = int(t)
        out.append(t)
        if t in eos:
            return out, True
    while out and pad_token_id is not None and out[-1] == pad_token_id and pad_token_id not in eos:
        out.pop()
    if stop_strings:
        text = tokenizer.decode(out, skip_special_tokens=True)
        if any(s in text for s in stop_strings):
            for n in range(1, len(out) + 1):  # the shortest prefix that completes a stop string
                prefix = tokenizer.decode(out[:n], skip_special_tokens=True)
                if any(s in prefix for s in stop_strings):
                    return out[:n], True
    return out, False


def _strip_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@torch.no_grad()
def generate_from_ids(model: torch.nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                      sampling: SamplingConfig) -> list[Sample]:
    """Sample one response per prompt (token ids), in batches of ``sampling.batch_size``."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    samples: list[Sample] = []
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    if sampling.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    rng_ctx = torch.random.fork_rng(devices=[]) if sampling.seed is not None else nullcontext()
    with rng_ctx:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(prompt_ids), sampling.batch_size):
            chunk = [list(p) for p in prompt_ids[start : start + sampling.batch_size]]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.as_tensor(p)
                attention[i, width - len(p) :] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 **gen_kwargs)
            for i, p in enumerate(chunk):
                ids, finished = cut_response(out[i, width:].tolist(), eos, pad, tokenizer, sampling.stop_strings)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                samples.append(Sample(p, ids, _strip_stop(text, sampling.stop_strings), finished))
    if was_training:
        model.train()
    return samples


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], sampling: SamplingConfig,
             *, template: str = "chat") -> list[Sample]:
    """Render prompts (strings or chat messages) with ``template`` and sample one response each."""
    ids = [encode_prompt(tokenizer, p, template=template) for p in prompts]
    return generate_from_ids(model, tokenizer, ids, sampling)

