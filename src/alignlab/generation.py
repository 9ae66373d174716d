"""One sampler for every stage that generates (``generate``, PPO, rejection sampling, best-of-n, the lab).

Backends, behind one interface (:class:`Sampler`: ``sync(model)`` then ``generate(prompt_ids, sampling)``;
:func:`make_sampler` picks one by name, the ``backend`` option of PPO, ``rs`` and ``bon``):

* ``hf`` (default): Hugging Face ``generate`` with its KV cache, prompts left-padded so a batch decodes
  together (:func:`generate_from_ids`);
* ``vllm`` (optional, GPU): a ``vllm.LLM`` built from the policy's weights, re-synchronised from the trained
  policy before every rollout (:class:`VLLMSampler`). vllm is imported only when this backend is chosen.

Responses are cut at the first EOS (kept, and the sample marked finished) or at the first stop string;
a response that hits ``max_new_tokens`` first is marked unfinished, so PPO can penalise it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from alignlab.data.tokenize import encode_prompt, shared_prefix_length
from alignlab.errors import AlignlabError


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
    precision: str = "fp32"  # "bf16": decode under bf16 autocast (faster on CPUs with native bf16: BENCHMARKS.md)
    share_prefix: bool = True  # encode a batch's common prompt prefix and repeated prompts once (_shared_prefill)


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


class _InverseCDFSampling(LogitsProcessor):
    """Plain temperature sampling, done here rather than by ``generate(do_sample=True)``: on CPU, HF's
    ``torch.multinomial`` draws an exponential variate for every vocabulary entry at every step (about a fifth of
    SmolLM2-135M's decoding time at batch 48); one uniform per row against the cumulative distribution samples the
    same distribution for the price of a cumulative sum. Returns logits that are -inf except at the drawn token,
    so greedy decoding emits it."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float() / self.temperature, dim=-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        # right=True: the first entry whose cumulative probability exceeds u, never a zero-probability token
        token = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


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
    if sampling.temperature > 0 and sampling.top_p >= 1.0 and not sampling.top_k:
        # plain sampling: drawn by our processor, then picked greedily (see _InverseCDFSampling)
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList([_InverseCDFSampling(sampling.temperature)]))
    elif sampling.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    rng_ctx = torch.random.fork_rng(devices=[]) if sampling.seed is not None else nullcontext()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=sampling.precision == "bf16")
    with rng_ctx, autocast:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(prompt_ids), sampling.batch_size):
            chunk = [list(p) for p in prompt_ids[start : start + sampling.batch_size]]
            width = max(len(p) for p in chunk)
            shared = shared_prefix_length(chunk) if sampling.share_prefix else 0  # a token left for generate
            input_ids, attention = (x.to(device) for x in _layout_prompts(chunk, shared, width, pad))
            cache = _shared_prefill(model, chunk, shared, input_ids, attention) if sampling.share_prefix else None
            out = model.generate(input_ids=input_ids, attention_mask=attention, **gen_kwargs, **(cache or {}))
            for i, p in enumerate(chunk):
                ids, finished = cut_response(out[i, width:].tolist(), eos, pad, tokenizer, sampling.stop_strings)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                samples.append(Sample(p, ids, _strip_stop(text, sampling.stop_strings), finished))
    if was_training:
        model.train()
    return samples


def _layout_prompts(chunk: list[list[int]], shared: int, width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch for ``generate``: ``[shared prefix | padding | rest of the prompt]`` per row, so the
    first ``shared`` columns are the same tokens at the same positions in every row (with ``shared=0``: plain
    left padding). ``generate`` takes position ids from the attention mask, so padding in the middle is skipped."""
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        input_ids[i, :shared] = torch.as_tensor(p[:shared], dtype=torch.long)
        attention[i, :shared] = 1
        rest = p[shared:]
        input_ids[i, width - len(rest) :] = torch.as_tensor(rest, dtype=torch.long)
        attention[i, width - len(rest) :] = 1
    return input_ids, attention


def _shared_prefill(model: torch.nn.Module, chunk: list[list[int]], shared: int, input_ids: torch.Tensor,
                    attention: torch.Tensor) -> dict[str, Any] | None:
    """The KV cache of every prompt but its last token, computed without repeating work: the prefix all prompts
    share once (batch 1), then each distinct prompt's rest once, then rows copied to the batch. Returns
    ``{keyword: cache}`` for ``generate``, or None when nothing is shared or the model's cache cannot be copied
    this way (``generate`` then encodes each prompt whole).

    Why: in the lab every prompt starts with the same Alpaca preamble (most of its tokens) and PPO,
    rejection sampling and best-of-n sample several answers per prompt, so most of the prefill was the same
    tokens again (BENCHMARKS.md, the lab's section). The same next-token logits as the plain path up to float
    rounding (another order of sums; tested to 1e-5)."""
    row_of: dict[tuple[int, ...], int] = {}  # each distinct prompt -> its row in the prefill
    first: list[int] = []  # the chunk row where each distinct prompt first appears
    for i, p in enumerate(chunk):
        if tuple(p) not in row_of:
            row_of[tuple(p)] = len(first)
            first.append(i)
    if shared == 0 and (len(first) == len(chunk) or input_ids.shape[1] == 1):
        return None  # nothing shared, or nothing to prefill before the last token
    key = _cache_keyword(model)
    if key is None or getattr(getattr(model, "generation_config", None), "cache_implementation", None):
        return None  # generate refuses a cache of ours next to its own cache implementation
    width = input_ids.shape[1]
    extra: dict[str, Any] | None = {}
    if shared:
        extra = prefix_cache(model, input_ids[:1, :shared], len(first))
        if extra is None:
            return None
    if width - 1 > shared:  # each distinct prompt's rest, but for its last token
        ids, mask = input_ids[first, : width - 1], attention[first, : width - 1]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                    use_cache=True, **extra, **_one_logit(model))
        extra = {key: _output_cache(out)}
    cache = extra[key]
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(torch.as_tensor([row_of[tuple(p)] for p in chunk]))
    return extra


def prefix_cache(model: torch.nn.Module, prefix: torch.Tensor, rows: int) -> dict[str, Any] | None:
    """The KV cache of one token prefix (shape (1, p)), copied to ``rows`` rows, as the keyword argument the
    model's forward takes it under; None where the model or its cache cannot do this (the caller then encodes
    the prefix in every row). Feed the rest of each row with the attention mask of the whole row and its
    position ids (they continue from ``p``)."""
    key = _cache_keyword(model)
    if key is None:
        return None
    cache = _output_cache(model(input_ids=prefix, use_cache=True, **_one_logit(model)))
    if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
        return None
    cache.batch_repeat_interleave(rows)
    return {key: cache}


def forward_after_prefix(model: torch.nn.Module, prefix: Sequence[int], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
    """``model``'s output for rows that all start with ``prefix``, given without it (``input_ids``, their
    attention mask and their position ids counted from 0 after the prefix): the prefix runs once and its KV cache
    is copied to every row (:func:`prefix_cache`). None where the model cannot take such a cache (the caller
    then runs whole rows)."""
    extra = prefix_cache(model, torch.tensor([list(prefix)], device=input_ids.device), input_ids.shape[0])
    if extra is None:
        return None
    ones = attention_mask.new_ones((input_ids.shape[0], len(prefix)))
    return model(input_ids=input_ids, attention_mask=torch.cat([ones, attention_mask], dim=1),
                 position_ids=position_ids + len(prefix), use_cache=True, **extra, **kwargs)


def _forward_params(model: torch.nn.Module) -> Any:
    import inspect

    from alignlab.models import is_peft

    base = model.get_base_model() if is_peft(model) else model
    return inspect.signature(base.forward).parameters


def _cache_keyword(model: torch.nn.Module) -> str | None:
    """The name a decoder's forward takes its KV cache under: ``cache`` (transformers 5.x) or
    ``past_key_values`` (4.x); None for a model with neither, or one whose attention a prefix shared through
    padding in the middle would change (sliding-window or recurrent layers: padding uses up the window or
    advances the state)."""
    config = getattr(model, "config", None)
    layers = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) or layers != {"full_attention"}:
        return None
    return next((k for k in ("cache", "past_key_values") if k in _forward_params(model)), None)


def _one_logit(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the forward takes it: a prefill only needs the cache."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], sampling: SamplingConfig,
             *, template: str = "chat") -> list[Sample]:
    """Render prompts (strings or chat messages) with ``template`` and sample one response each."""
    ids = [encode_prompt(tokenizer, p, template=template) for p in prompts]
    return generate_from_ids(model, tokenizer, ids, sampling)



# ----------------------------------------------------------------------------------------------- backends

BACKENDS = ("hf", "vllm")


class Sampler:
    """What every generating stage calls: ``sync(model)`` when the policy's weights changed (PPO: every
    iteration), then ``generate(prompt_ids, sampling)`` -> one :class:`Sample` per prompt."""

    name = "base"

    def sync(self, model: torch.nn.Module) -> None:
        raise NotImplementedError

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Sample]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (a vLLM engine's GPU memory)."""


class HFSampler(Sampler):
    """Hugging Face ``generate`` (:func:`generate_from_ids`) on the current weights.

    With ``precision="bf16"`` on a CPU and a float32 model, sampling runs on a bf16 copy of the weights (a LoRA
    adapter merged in), refreshed at each :meth:`sync`: under autocast every decoding step would recast all
    weights to bf16 (and peft adds its adapter matmuls on top), so with a LoRA adapter the copy decodes
    faster (measured in BENCHMARKS.md, the lab's PPO rollouts). Log-probs for training are always
    recomputed by the trained model, so the copy only proposes the tokens, as a vLLM engine would. Otherwise
    ``sync`` just points at the model."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._copy: torch.nn.Module | None = None
        self._fresh = False

    def sync(self, model: torch.nn.Module) -> None:
        self.model, self._fresh = model, False

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Sample]:
        param = next(self.model.parameters())
        if sampling.precision == "bf16" and param.device.type == "cpu" and param.dtype == torch.float32:
            if not self._fresh:
                self._copy = bf16_copy(self.model, into=self._copy)
                self._fresh = True
            return generate_from_ids(self._copy, self.tokenizer, prompt_ids, replace(sampling, precision="fp32"))
        return generate_from_ids(self.model, self.tokenizer, prompt_ids, sampling)

    def proposal_model(self) -> torch.nn.Module | None:
        """The model that proposed the last rollout's tokens when it is not the trained one (the bf16 copy),
        else None: a trainer measures and corrects the gap between the two (GRPO's importance correction)."""
        return self._copy if self._fresh else None


def bf16_copy(model: torch.nn.Module, into: torch.nn.Module | None = None) -> torch.nn.Module:
    """A plain transformers model holding ``model``'s current weights in bf16 (a LoRA adapter merged in), for
    sampling. ``into``: an earlier copy to refresh in place instead of building a new one."""
    from alignlab.models import is_peft

    weights = _plain_weights(model)
    if into is None:
        base = model.get_base_model() if is_peft(model) else model
        into = type(base)(copy.deepcopy(base.config)).to(dtype=torch.bfloat16, device=next(model.parameters()).device)
        into.generation_config = copy.deepcopy(base.generation_config)
        into.eval()
    into.load_state_dict(weights)  # copies, casting to bf16
    return into


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or ``vllm`` where vllm is not installed, before any model is loaded."""
    if backend not in BACKENDS:
        raise AlignlabError(f"unknown generation backend '{backend}' (choose {', '.join(BACKENDS)})",
                            field="backend")
    if backend == "vllm" and not vllm_available():
        raise AlignlabError("backend=vllm needs the vllm package, which is not installed: `pip install vllm` "
                            "on a machine with a CUDA GPU, or use backend=hf (Hugging Face generate, the "
                            "default)", field="backend")


def _plain_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the plain transformers names, each LoRA adapter's ``B A x scale`` added to its
    base weight (computed aside: the model itself is not touched, so its base weights stay bit-exact)."""
    from alignlab.models import is_peft

    if not is_peft(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach()
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    out = {}
    for name, value in base.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        name = name.replace(".base_layer", "").replace("modules_to_save.default.", "")
        out[name] = value.detach() + deltas[name] if name in deltas else value.detach()
    return out


class VLLMSampler(Sampler):
    """vLLM generation (paged attention, continuous batching) for PPO, rejection sampling and best-of-n.

    The engine is built once from a checkpoint folder (the policy's, or a temporary copy of the live policy
    saved as safetensors), in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that :meth:`sync` can
    load the trained weights straight into its model (``load_weights``, as TRL's colocate mode does) before
    each rollout. Sampling: one completion per prompt with ``temperature``/``top_p``/``top_k``/``max_tokens``
    and a per-call ``seed``; outputs go through the same EOS/stop-string cutting as the ``hf`` backend.

    UNCHECKED: written against vLLM's documented ``LLM`` API but never run here (no GPU, no vllm on the
    development machine). The ``hf`` backend is the reference; compare the two on a GPU before relying on it.
    Log-probs for PPO are always recomputed by the trained model, so vLLM only proposes the tokens.
    """

    name = "vllm"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, checkpoint: str | None = None,
                 gpu_memory_utilization: float = 0.3, dtype: str = "auto") -> None:
        check_backend("vllm")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's model in this process
        import vllm  # lazy: an optional dependency

        self._vllm = vllm
        self.tokenizer = tokenizer
        self._tmp: tempfile.TemporaryDirectory | None = None
        if checkpoint is None:  # the live policy, written once so vLLM can read its config and tokenizer
            from alignlab.models import save_model

            self._tmp = tempfile.TemporaryDirectory(prefix="alignlab-vllm-")
            checkpoint = str(save_model(model, tokenizer, os.path.join(self._tmp.name, "policy")))
        self.llm = vllm.LLM(model=checkpoint, tokenizer=checkpoint, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)

    def sync(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into the engine (a LoRA adapter merged in)."""
        weights = list(_plain_weights(model).items())
        if hasattr(self.llm, "apply_model"):  # recent vLLM: run a function on the engine's model
            self.llm.apply_model(lambda m: m.load_weights(weights))
        else:  # older vLLM (V0 engine)
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):  # cached KV blocks were computed by the old weights
            self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Sample]:
        vllm = self._vllm
        params = vllm.SamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            top_k=(sampling.top_k or -1) if sampling.temperature > 0 else -1, seed=sampling.seed,
            stop=list(sampling.stop_strings) or None, skip_special_tokens=True,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        samples = []
        for p, out in zip(prompt_ids, outputs):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and completion.stop_reason is None and (not ids or ids[-1] != eos):
                ids.append(eos)  # finished by EOS: keep it, as the hf backend does
            ids, finished = cut_response(ids, eos, pad, self.tokenizer, sampling.stop_strings)
            text = _strip_stop(self.tokenizer.decode(ids, skip_special_tokens=True), sampling.stop_strings)
            samples.append(Sample(list(p), ids, text, finished or completion.finish_reason == "stop"))
        return samples

    def close(self) -> None:
        self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_sampler(backend: str, model: torch.nn.Module, tokenizer: Any, *, checkpoint: str | None = None,
                 **vllm_kwargs: Any) -> Sampler:
    """The sampler for ``backend`` (``hf`` or ``vllm``). ``checkpoint``: the folder ``model`` was loaded from
    (vLLM then reads it instead of a temporary copy of ``model``)."""
    check_backend(backend)
    if backend == "vllm":
        return VLLMSampler(model, tokenizer, checkpoint=checkpoint, **vllm_kwargs)
    return HFSampler(model, tokenizer)
