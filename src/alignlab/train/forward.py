"""Batches laid out so the LM head only runs where a loss is taken, and the log-probs of those tokens.

Three layouts: right-padded rows with the head on the gathered loss rows (SFT, :func:`loss_rows_cross_entropy`);
shared prompts (DPO, KTO, PPO and reward models, :func:`collate_shared_prompt`: each prompt encoded once, its
responses after it, attention computed per response, :func:`segment_attention_forward`); and the aligned layout
below, the fallback for engines that shard weights between calls (FSDP, DeepSpeed ZeRO-3), where the head cannot
run outside the model's forward.

Layout ("aligned" batches): each row is left-padded so that its first loss token sits at the same column
for every row, and right-padded to a common length. The positions that predict loss tokens are then the
last ``k`` columns for every row, so the model's own ``logits_to_keep=k`` argument slices the hidden states
before the LM head: no logits are ever computed for prompt tokens (on SmolLM2 the LM head over a 49k
vocabulary costs as much as the rest of the model for short answers). Position ids are derived from the
attention mask, so left padding does not shift RoPE positions. Because the slicing happens inside the
model's own ``forward``, this works unchanged under DDP, FSDP and DeepSpeed wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Self

import torch
import torch.utils.checkpoint
from accelerate.utils import extract_model_from_parallel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignlab.data.tokenize import IGNORE_INDEX, shared_prefix_length
from alignlab.losses.common import selective_log_softmax
from alignlab.models import autocast_weight


@dataclass
class AlignedBatch:
    """A padded batch whose loss positions are the last ``keep`` columns.

    Shapes: ``input_ids``, ``attention_mask``, ``position_ids``: (b, t); ``targets``, ``loss_mask``: (b, k)
    with ``k = keep``: the token predicted at each kept column and whether it carries loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    keep: int

    def to(self, device: torch.device | str) -> Self:
        """A copy with every tensor on ``device``; a subclass's extra tensors move too."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate_aligned(
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int,
) -> AlignedBatch:
    """Pad ``sequences`` (token ids) with ``labels`` (same length; ``-100`` where no loss, else the token id
    itself, as Hugging Face labels are) into an :class:`AlignedBatch`.

    Row ``i`` with first loss token at index ``f_i`` (at least 1: token 0 has nothing to predict it) gets
    ``S - (f_i - 1)`` pads on the left, ``S = max_i (f_i - 1)``; column ``S + j`` then predicts the token in
    column ``S + j + 1`` for every row.
    """
    if len(sequences) != len(labels):
        raise ValueError("sequences and labels differ in count")
    starts = []
    for ids, lab in zip(sequences, labels):
        if len(ids) != len(lab):
            raise ValueError("a sequence and its labels differ in length")
        first = next((i for i, t in enumerate(lab) if t != IGNORE_INDEX and i > 0), None)
        starts.append((first if first is not None else len(ids)) - 1)
    shift = max(starts)
    width = max(shift - s + len(ids) for s, ids in zip(starts, sequences))
    b = len(sequences)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    full_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab, s) in enumerate(zip(sequences, labels, starts)):
        left = shift - s
        input_ids[row, left : left + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, left : left + len(ids)] = 1
        lab_t = torch.as_tensor(lab, dtype=torch.long)
        lab_t[0] = IGNORE_INDEX
        full_labels[row, left : left + len(ids)] = lab_t
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(1, width - shift - 1)
    # column shift + j predicts column shift + j + 1; the last column predicts nothing
    targets = full_labels[:, shift + 1 : shift + 1 + keep]
    if targets.shape[1] < keep:
        targets = torch.nn.functional.pad(targets, (0, keep - targets.shape[1]), value=IGNORE_INDEX)
    loss_mask = targets != IGNORE_INDEX
    return AlignedBatch(input_ids, attention_mask, position_ids, targets.clamp(min=0), loss_mask, keep)


def aligned_logits(model: torch.nn.Module, batch: AlignedBatch) -> torch.Tensor:
    """Logits (b, k, v) of the kept columns only. The last kept column is ``t - 2`` (the final column
    predicts nothing), so we ask the model for ``k + 1`` columns and drop the last."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def completion_logps(model: torch.nn.Module, batch: AlignedBatch, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (b, k) of the targets in float32, zero where ``loss_mask`` is 0. No (b, t, v)
    log-softmax is materialised: only the kept columns get logits, and the log-prob is gathered then normalised.
    Under bf16 autocast the normalisation is still float32 (:func:`selective_log_softmax`): DPO differences sums
    of hundreds of token log-probs, and bf16 rounding of each (8 bits of mantissa) would swamp the small
    differences between policy and reference."""
    logits = aligned_logits(model, batch)
    if temperature != 1.0:
        logits = logits.float() / temperature
    return selective_log_softmax(logits, batch.targets).float() * batch.loss_mask


def sum_token_cross_entropy(model: torch.nn.Module, batch: AlignedBatch) -> torch.Tensor:
    """The summed negative log-likelihood of the loss tokens (a scalar), via the fused cross-entropy
    kernel; divide by the global token count for the SFT loss.

    Positions without loss are left out with ``ignore_index`` rather than a boolean gather of the logits:
    the same sum and the same gradients, without the (rows, v) gather and its zero-filled scatter in the
    backward pass (measured in BENCHMARKS.md)."""
    logits = aligned_logits(model, batch)
    targets = batch.targets.masked_fill(~batch.loss_mask, IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


# --------------------------------------------------------------------------- SFT: the LM head on loss rows only


@dataclass
class PaddedBatch:
    """A right-padded batch, the layout with the least padding when a loss covers whole rows.

    Shapes: ``input_ids``, ``attention_mask``: (b, t); ``targets``: (b, t - 1), the token column ``j`` predicts
    (``-100`` where there is no loss).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def collate_right(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                  pad_token_id: int) -> PaddedBatch:
    """Right-pad ``sequences`` and their Hugging Face style ``labels`` (``-100`` where no loss)."""
    if len(sequences) != len(labels) or any(len(s) != len(lab) for s, lab in zip(sequences, labels)):
        raise ValueError("sequences and labels differ in count or length")
    b, width = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    full_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        full_labels[row, : len(lab)] = torch.as_tensor(lab, dtype=torch.long)
    return PaddedBatch(input_ids, attention_mask, full_labels[:, 1:])


def loss_rows_cross_entropy(model: torch.nn.Module, batch: PaddedBatch) -> torch.Tensor:
    """The summed NLL of the loss tokens (a scalar), with the LM head applied to those positions only.

    Why not ``logits_to_keep``: it keeps the same columns for every row, so with right padding it would
    still run the head over other rows' prompts and padding. Here the model returns its final (normed) hidden
    states, the loss positions are gathered into one (n, d) matrix, and the head runs on those n rows: on
    a 49k vocabulary a faster SFT step than the aligned layout (BENCHMARKS.md).

    The head's weight is used outside the model's ``forward``, which is right for a plain or DDP model
    (DDP hooks gradients by parameter) but not for engines that shard weights between calls (FSDP,
    DeepSpeed ZeRO-3): use :func:`collate_aligned` with :func:`sum_token_cross_entropy` there.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][:, :-1]
    rows = batch.targets != IGNORE_INDEX
    head = extract_model_from_parallel(model).get_output_embeddings()
    logits = head(hidden[rows])
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets[rows], reduction="sum")


def loss_free_prefix_length(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> int:
    """How many first tokens ``sequences`` share (:func:`~alignlab.data.tokenize.shared_prefix_length`) that
    carry no loss in any of them (Hugging Face ``labels``, ``-100`` where no loss): what
    :func:`shared_prefix_cross_entropy` can encode once."""
    n = shared_prefix_length(sequences)
    for lab in labels:
        n = min(n, next((i for i, t in enumerate(lab) if t != IGNORE_INDEX and i > 0), n))
    return n


def shared_prefix_cross_entropy(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                                labels: Sequence[Sequence[int]], shared: int, pad_token_id: int,
                                device: torch.device | str) -> torch.Tensor:
    """:func:`loss_rows_cross_entropy` for sequences whose first ``shared`` tokens are the same and carry no
    loss (:func:`loss_free_prefix_length`), with that prefix encoded once: each sequence is a group of one response
    after it in a segment-attention row (:func:`collate_shared_prompt`, whose root is the prefix). The same sum
    up to float rounding; for a model that runs segment attention (:func:`use_segment_attention`).

    Why: SFT data in one template share its preamble (the Alpaca text, 44 tokens with SmolLM2's tokenizer; a chat
    template's system header, ~20), often a large share of short examples' tokens."""
    groups = [(list(s[:shared]), [list(s[shared:])]) for s in sequences]
    batch = collate_shared_prompt(groups, pad_token_id, segments=True).to(device)
    targets = torch.full(batch.mask.shape, IGNORE_INDEX, dtype=torch.long)
    for i, lab in enumerate(labels):  # the label values themselves are the targets, as on the padded path
        targets[i, : len(lab) - shared] = torch.as_tensor(list(lab[shared:]), dtype=torch.long)
    targets = targets.to(batch.mask.device)
    loss = (targets != IGNORE_INDEX) & batch.mask
    hidden = shared_prompt_hidden(model, batch)
    head = extract_model_from_parallel(model).get_output_embeddings()
    logits = head(hidden[batch.predictors[loss]])
    return torch.nn.functional.cross_entropy(logits.float(), targets[loss], reduction="sum")


def _head_token_logps(weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    return torch.nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).gather(
        -1, targets.unsqueeze(-1)).squeeze(-1)


def _head_weights(head: torch.nn.Module, device_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in the dtype autocast would run it in, cast once per call (or taken from the
    cache of a frozen head, :func:`~alignlab.models.cache_frozen_weight_casts`).

    Under autocast a frozen weight (the tied embedding under LoRA) is cast again at every use, and the head runs
    once per chunk and again in the checkpointed backward: on SmolLM2 that is a (49152, 576) cast several times
    a step, a visible share of a LoRA DPO step in torch.profiler. The cast here is differentiable, so a trained head
    still gets its gradient."""
    weight, bias = autocast_weight(head, device_type), getattr(head, "bias", None)
    if bias is not None:
        bias = bias.to(weight.dtype)
    return weight, bias


# --------------------------------------------------------------------------- shared prompts: each prompt encoded once


class SegmentPlan:
    """Which keys each query attends to in a shared-prompt batch laid out as one row, as a list of *fragments*.

    A fragment ``(q0, q1, context)`` is a run of query columns ``q0:q1`` (the prompts' common root, the rest of a
    prompt, or one response) that attends to every key column of the ranges in ``context`` (flat bounds ``(a0,
    b0, a1, b1, ...)``: the root, then its prompt's rest, as they apply) and causally to its own columns
    ``q0:q1``. Fragments cover the row's columns in order. ``masks[i]``: the bool mask ``(q1 - q0, context
    columns + q1 - q0)`` of fragment ``i`` (None where it is plainly causal: an empty context)."""

    def __init__(self, fragments: list[tuple[int, int, tuple[int, ...]]], masks: list[torch.Tensor | None]) -> None:
        self.fragments, self.masks = fragments, masks

    def to(self, device: torch.device | str) -> SegmentPlan:
        return SegmentPlan(self.fragments, [m if m is None else m.to(device) for m in self.masks])

    def dense_mask(self, width: int, device: torch.device | str) -> torch.Tensor:
        """The same attention pattern as a ``(1, 1, width, width)`` bool mask, for attention kernels that take
        one (every other implementation than :func:`segment_attention_forward`)."""
        mask = torch.zeros((width, width), dtype=torch.bool, device=device)
        for q0, q1, context in self.fragments:
            for a, b in zip(context[::2], context[1::2]):
                mask[q0:q1, a:b] = True
            mask[q0:q1, q0:q1] = torch.ones((q1 - q0, q1 - q0), dtype=torch.bool, device=device).tril()
        return mask[None, None]


@dataclass
class SharedPromptBatch:
    """Groups of responses to one prompt, laid out so that each prompt is encoded once.

    A *segment* is a prompt followed by some or all of its responses; each response token attends (causally) to its own
    prompt and to the earlier tokens of its own response only, and its position ids continue from the end of the
    prompt, so every response gets exactly the hidden states it would get as its own ``prompt + response``
    sequence. Two ways to lay segments out:

    - *segment attention* (``segments`` set): every group is one segment, all in one row with no padding, and
      attention runs fragment by fragment (:class:`SegmentPlan`, :func:`segment_attention_forward`), so it costs
      what the separate sequences' attention would, whatever the row's width; ``attention_mask`` is None;
    - *packed rows* under a 4D mask (for attention kernels that take only a mask): segments are packed into rows
      (first fit, longest first), and a group whose responses are long may be split among several copies of its
      prompt (:func:`plan_segments`), as the kernel computes every cell of a row, masked or not. Pad columns attend
      to earlier pad columns only.

    Shapes: ``input_ids``, ``position_ids``: ``(r, t)``; ``attention_mask``: ``(r, 1, t, t)`` bool (True:
    attend), passed to the model as a ready 4D mask; ``last``: ``(n,)`` the flat index (``row * t + column``)
    of each response's last token, responses listed group by group; ``predictors``: ``(n, k)`` the flat index
    of the position whose hidden state predicts each response token (0 where ``mask`` is False); ``targets``,
    ``mask``: ``(n, k)`` the response tokens and which are real (a response's first token has no predictor when
    its prompt is empty).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    last: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    tokens: int
    encoded: int
    segments: SegmentPlan | None = None

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        return SharedPromptBatch(
            self.input_ids.to(device), self.position_ids.to(device),
            None if self.attention_mask is None else self.attention_mask.to(device),
            self.last.to(device), self.predictors.to(device), self.targets.to(device), self.mask.to(device),
            self.tokens, self.encoded, None if self.segments is None else self.segments.to(device),
        )

    def model_inputs(self, model: torch.nn.Module) -> dict[str, Any]:
        """The keyword arguments of ``model``'s forward for this batch (:func:`model_inputs`)."""
        return model_inputs(model, self.input_ids, self.position_ids, self.attention_mask, self.segments)


def model_inputs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, segments: SegmentPlan | None = None) -> dict[str, Any]:
    """The keyword arguments of ``model``'s forward: with a segment plan, the plan for segment attention (or, for
    a model that cannot run it, the plan as a 4D mask); a 4D bool mask in the form ``model``'s attention takes
    it (:func:`mask_for_attention`); anything else as it is."""
    inputs: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids}
    if segments is not None and use_segment_attention(model):
        # a 4D mask makes transformers skip building its own (t, t) mask; the plan says what attends where
        inputs["attention_mask"] = torch.zeros((), dtype=torch.bool, device=input_ids.device).expand(
            1, 1, input_ids.shape[1], input_ids.shape[1])
        inputs["segments"] = segments
        return inputs
    if segments is not None:
        attention_mask = segments.dense_mask(input_ids.shape[1], input_ids.device)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = mask_for_attention(model, attention_mask)
    inputs["attention_mask"] = attention_mask
    return inputs


# --------------------------------------------------------------------------- segment attention

SEGMENT_ATTENTION = "alignlab_segments"


def segment_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              segments: SegmentPlan | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over a shared-prompt row, one fragment at a time (a transformers attention function).

    Why not a mask: the CPU kernels of ``scaled_dot_product_attention`` compute every cell of a masked row, so a
    row holding a prompt and its K responses would cost ``(p + sum m)^2`` cells where the responses need only
    ``sum m (p + m)``; flex attention and variable-length flash attention, which skip masked blocks, are not
    usable on CPUs without compilation. Here each fragment runs the plain kernel on its own keys: a prompt
    causally over itself (the kernel's fast causal path), a response over its prompt's keys and its own,
    causally. Without ``segments`` (generation, ordinary batches) this is transformers' own SDPA attention.

    Shapes: ``query`` ``(1, h, t, d)``, ``key``/``value`` ``(1, h_kv, t, d)``; returns ``(1, t, h, d)``."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # The CPU kernel takes grouped keys as they are (no copies per query head); CUDA's fused kernels do not with
    # a mask (SDPA would fall back to its math kernel), so there the keys are repeated as transformers does.
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = {"enable_gqa": True} if groups > 1 and query.device.type == "cpu" else {}
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # Cut each tensor once at every fragment boundary (``torch.split``: its backward is one concatenation), not
    # by slicing per fragment: the backward of each slice writes a zero tensor of the whole row, ~25 of them
    # per tensor and layer in a reward-model batch of 8 pairs.
    points = sorted({0, query.shape[2], *(point for q0, q1, context in segments.fragments
                                          for point in (q0, q1, *context))})
    index = {point: i for i, point in enumerate(points)}
    sizes = [b - a for a, b in zip(points, points[1:])]
    queries, keys, values = (torch.split(x, sizes, dim=2) for x in (query, key, value))

    def span(pieces: tuple[torch.Tensor, ...], *bounds: int) -> torch.Tensor:
        """Columns ``bounds[0]:bounds[1]``, then ``bounds[2]:bounds[3]`` …, from the pieces."""
        parts = [p for a, b in zip(bounds[::2], bounds[1::2]) for p in pieces[index[a]:index[b]]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    pieces = []
    for (q0, q1, context), mask in zip(segments.fragments, segments.masks):
        if mask is None:
            pieces.append(torch.nn.functional.scaled_dot_product_attention(
                span(queries, q0, q1), span(keys, q0, q1), span(values, q0, q1), dropout_p=dropout, scale=scaling,
                is_causal=True, **gqa))
        else:
            pieces.append(torch.nn.functional.scaled_dot_product_attention(
                span(queries, q0, q1), span(keys, *context, q0, q1), span(values, *context, q0, q1), attn_mask=mask,
                dropout_p=dropout, scale=scaling, **gqa))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)  # ordinary batches get SDPA's masks


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Route ``model``'s attention through :func:`segment_attention_forward` if it uses transformers' SDPA
    attention (the same results for every input without a segment plan); True when it does. Models set to
    another implementation (eager, flash attention), and architectures that do not pass their forward's keyword
    arguments down to the attention function (``_supports_attention_backend``), are left as they are."""
    models = _transformers_models(model)
    if not models or not all(getattr(m, "_supports_attention_backend", False) for m in models):
        return False
    configs = {id(m.config): m.config for m in models}
    for config in configs.values():
        if config._attn_implementation == "sdpa":
            config._attn_implementation = SEGMENT_ATTENTION
    return all(c._attn_implementation == SEGMENT_ATTENTION for c in configs.values())


def mask_for_attention(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A ready 4D bool mask (True: attend) in the form ``model``'s attention takes it: as it is for SDPA, additive
    (0 or the float32 minimum) for eager attention, which adds the mask to its scores."""
    models = _transformers_models(model)
    if models and models[0].config._attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def shared_prompt_layout(model: torch.nn.Module) -> dict[str, Any]:
    """The keyword arguments of :func:`collate_shared_prompt` that suit ``model``: segment attention where the
    model can run it, else packed rows sized for its attention costs."""
    if use_segment_attention(model):
        return {"segments": True}
    models = _transformers_models(model)
    return {"crossover": attention_crossover(models[0].config)} if models else {}


def _transformers_models(model: torch.nn.Module) -> list[PreTrainedModel]:
    """The transformers models inside ``model`` (through DDP, PEFT and PPO's policy-and-value wrappers)."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def split_shared_prefix(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """``(prefix, suffixes)``: the longest common prefix of ``sequences``, kept one token short of the
    shortest so that every suffix is non-empty (its last token is where a reward model reads its score)."""
    n = shared_prefix_length(sequences)
    return list(sequences[0][:n]), [list(s[n:]) for s in sequences]


def pack_rows(widths: Sequence[int], cap: int | None = None) -> list[list[int]]:
    """Indices of ``widths`` packed into rows no wider than ``cap`` (default: the widest), first fit, widest
    first."""
    cap = max(widths) if cap is None else cap
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(widths)), key=lambda j: -widths[j]):
        slot = next((r for r, room in enumerate(free) if room >= widths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(cap - widths[i])
        else:
            rows[slot].append(i)
            free[slot] -= widths[i]
    return rows


def attention_crossover(config: Any) -> int:
    """The row width at which attention costs as much per token as the rest of a layer, for a model config.

    Per token and layer, the projections and MLP cost ``2 x`` their parameters in FLOPs and attention over a
    row of width ``W`` costs ``4 x W x d`` (scores and weighted values; CPU attention kernels compute masked-out
    blocks too), so a row of width ``W`` costs ``1 + W / crossover`` times its projections. For SmolLM2-135M
    the FLOP count gives 3,070; a fit to measured forward+backward times of DPO batches gave about 2,600
    (attention runs below the matmuls' efficiency), and the factor 0.85 is chosen to match that fit (2,611).
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    mlp = 3 * d * config.intermediate_size  # gated MLP (Llama family); close enough for others
    per_layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + mlp
    return max(1, int(0.85 * per_layer / (2 * d)))


def plan_segments(groups: Sequence[tuple[int, Sequence[int]]], crossover: int | None
                  ) -> tuple[list[tuple[int, list[int]]], int]:
    """Split each group (``prompt length``, ``response lengths``) into segments (a copy of the prompt and some
    of its responses) no wider than a row width ``W``, and choose ``W`` to minimise the estimated cost
    ``cells x (1 + W / crossover)`` of the packed rows. Sharing a prompt among more responses saves its tokens
    but widens the rows, and attention grows with the width: long responses are better in rows of their own,
    short ones after one shared prompt. ``crossover`` None: every group is one segment.

    Returns ``([(group, [response indices]), ...], W)``."""
    whole = [p + sum(rs) for p, rs in groups]
    if crossover is None:
        return [(g, list(range(len(rs)))) for g, (_, rs) in enumerate(groups)], max(whole)
    narrowest = max(p + max(rs) for p, rs in groups)  # every response with its prompt must fit
    best: tuple[float, list[tuple[int, list[int]]], int] | None = None
    for width in sorted({narrowest, *(w for w in whole if w > narrowest)}):
        segments, widths = [], []
        for g, (p, rs) in enumerate(groups):
            current, used = [], p
            for j, m in enumerate(rs):
                if current and used + m > width:
                    segments.append((g, current))
                    widths.append(used)
                    current, used = [], p
                current.append(j)
                used += m
            segments.append((g, current))
            widths.append(used)
        cells = len(pack_rows(widths, width)) * width
        cost = cells * (1 + width / crossover)
        if best is None or cost < best[0]:
            best = (cost, segments, width)
    assert best is not None
    return best[1], best[2]


def collate_shared_prompt(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                          pad_token_id: int, crossover: int | None = None, segments: bool = False
                          ) -> SharedPromptBatch:
    """Lay out ``groups`` of ``(prompt_ids, [response_ids, ...])`` as a :class:`SharedPromptBatch`
    (:func:`shared_prompt_layout` gives the options that suit a model).

    ``segments``: every group is one segment, all in one row, with a :class:`SegmentPlan` for segment attention;
    the prompts' common prefix (a chat template's system header, an instruction preamble; at most each prompt
    but its last token) comes first, once, as the *root* every segment attends to, and each prompt's rest
    follows it with position ids continuing from the root.
    Otherwise packed rows under a 4D mask: with ``crossover`` (:func:`attention_crossover` of the model), a
    group's responses may be split among several copies of its prompt when that is cheaper
    (:func:`plan_segments`); without it each group is one segment. Responses must be non-empty; the prompt may be
    empty (then each response's first token is not scored)."""
    if any(len(r) == 0 for _, rs in groups for r in rs):
        raise ValueError("a response is empty")
    root: list[int] = []
    if segments:
        if len(groups) > 1:
            root = list(groups[0][0][: shared_prefix_length([p for p, _ in groups])])
        parts = [(g, list(range(len(rs)))) for g, (_, rs) in enumerate(groups)]
        widths = [len(p) - len(root) + sum(len(r) for r in rs) for p, rs in groups]
        t, rows = len(root) + sum(widths), [list(range(len(parts)))]
    else:
        parts, t = plan_segments([(len(p), [len(r) for r in rs]) for p, rs in groups], crossover)
        widths = [len(groups[g][0]) + sum(len(groups[g][1][j]) for j in js) for g, js in parts]
        rows = pack_rows(widths, t)
    n = sum(len(rs) for _, rs in groups)
    k = max(len(r) for _, rs in groups for r in rs)
    input_ids = torch.full((len(rows), t), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), t), dtype=torch.long)
    segment = torch.full((len(rows), t), -1, dtype=torch.long)  # which segment a column belongs to (-1: pad)
    part = torch.full((len(rows), t), -1, dtype=torch.long)  # 0: the prompt, j: response j (1-based)
    last = torch.zeros(n, dtype=torch.long)
    predictors = torch.zeros((n, k), dtype=torch.long)
    targets = torch.zeros((n, k), dtype=torch.long)
    mask = torch.zeros((n, k), dtype=torch.bool)
    first_response = [0]
    for _, rs in groups:
        first_response.append(first_response[-1] + len(rs))
    fragments: list[tuple[int, int, tuple[int, ...]]] = []
    masks: list[torch.Tensor | None] = []
    shapes: dict[tuple[int, int], torch.Tensor] = {}  # (context, own) lengths -> the fragment's mask

    def attend(q0: int, q1: int, context: tuple[int, ...]) -> None:
        """A fragment: columns ``q0:q1`` see the ``context`` ranges whole and themselves causally."""
        c, m = sum(b - a for a, b in zip(context[::2], context[1::2])), q1 - q0
        if c and (c, m) not in shapes:
            shapes[c, m] = torch.cat([torch.ones((m, c), dtype=torch.bool),
                                      torch.ones((m, m), dtype=torch.bool).tril()], dim=1)
        fragments.append((q0, q1, context if c else ()))
        masks.append(shapes[c, m] if c else None)

    base = len(root)  # the root's columns, in the single row of segment attention
    if root:
        attend(0, base, ())
        input_ids[0, :base] = torch.as_tensor(root, dtype=torch.long)
        position_ids[0, :base] = torch.arange(base)
    for r, members in enumerate(rows):
        col = base if r == 0 else 0
        for s in members:
            g, js = parts[s]
            prompt, responses = groups[g]
            p = len(prompt)
            own = p - base  # the prompt's columns in this segment (all of it without a root)
            if own > 0:
                attend(col, col + own, (0, base) if base else ())
            input_ids[r, col : col + own] = torch.as_tensor(list(prompt[base:]), dtype=torch.long)
            position_ids[r, col : col + own] = torch.arange(base, p)
            segment[r, col : col + own] = s
            part[r, col : col + own] = 0
            start = col + own
            for j in js:
                m, i = len(responses[j]), first_response[g] + j
                input_ids[r, start : start + m] = torch.as_tensor(list(responses[j]), dtype=torch.long)
                position_ids[r, start : start + m] = torch.arange(p, p + m)
                segment[r, start : start + m] = s
                part[r, start : start + m] = j + 1
                flat = r * t + start
                last[i] = flat + m - 1
                targets[i, :m] = input_ids[r, start : start + m]
                predictors[i, 1:m] = torch.arange(flat, flat + m - 1)
                mask[i, 1:m] = True
                if p > 0:
                    predictors[i, 0] = r * t + col + own - 1  # own > 0: the root is each prompt but its last token
                    mask[i, 0] = True
                attend(start, start + m, ((0, base) if base else ()) + ((col, col + own) if own else ()))
                start += m
            col = start
    tokens = sum(len(p) * len(rs) + sum(len(x) for x in rs) for p, rs in groups)
    if segments:
        return SharedPromptBatch(input_ids, position_ids, None, last, predictors, targets, mask, tokens, t,
                                 SegmentPlan(fragments, masks))
    q_segment, kv_segment = segment.unsqueeze(-1), segment.unsqueeze(-2)
    q_part, kv_part = part.unsqueeze(-1), part.unsqueeze(-2)
    causal = torch.ones((t, t), dtype=torch.bool).tril()
    attention_mask = causal & (q_segment == kv_segment) & ((kv_part == 0) | (q_part == kv_part))
    return SharedPromptBatch(input_ids, position_ids, attention_mask.unsqueeze(1), last, predictors, targets, mask,
                             tokens, sum(widths))


def shared_prompt_hidden(model: torch.nn.Module, batch: SharedPromptBatch) -> torch.Tensor:
    """The final (normed) hidden states ``(r * t, d)`` of a :class:`SharedPromptBatch`, flattened so that
    ``batch.last`` and ``batch.predictors`` index them."""
    extra = {"logits_to_keep": 1} if _is_causal_lm(model) else {}
    out = model(**batch.model_inputs(model), output_hidden_states=True, use_cache=False, **extra)
    hidden = out.hidden_states[-1]
    return hidden.reshape(-1, hidden.shape[-1])


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return extract_model_from_parallel(model).get_output_embeddings() is not None


def shared_prompt_logps(model: torch.nn.Module, batch: SharedPromptBatch, chunk_rows: int = 1024) -> torch.Tensor:
    """Per-token log-probs ``(n, k)`` (float32) of every response token, zero where ``batch.mask`` is False:
    the LM head runs on response positions only, in checkpointed chunks
    (:func:`_chunked_token_logps`), and each prompt is encoded once for all of its responses."""
    hidden = shared_prompt_hidden(model, batch)
    head = extract_model_from_parallel(model).get_output_embeddings()
    picked = _chunked_token_logps(head, hidden[batch.predictors[batch.mask]], batch.targets[batch.mask], chunk_rows)
    logps = torch.zeros(batch.mask.shape, dtype=torch.float32, device=hidden.device)
    return logps.masked_scatter(batch.mask, picked) if picked.numel() else logps


def _chunked_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int) -> torch.Tensor:
    """``log p(target)`` (float32) for each row of ``hidden`` ``(n, d)``.

    The ``(n, v)`` logits are never all held at once: each chunk of ``chunk_rows`` rows goes through the head
    and its log-softmax (in float32, as preference losses difference sums of hundreds of log-probs) under
    activation checkpointing when gradients are on, so the backward pass recomputes that chunk's logits
    instead of keeping them (on SmolLM2 with 8 DPO pairs of ~500 tokens, the kept logits alone would be
    several GiB)."""
    weight, bias = _head_weights(head, hidden.device.type)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_head_token_logps, weight, bias, h, t,
                                                            use_reentrant=False))
        else:
            pieces.append(_head_token_logps(weight, bias, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def shared_prompt_scores(model: torch.nn.Module, batch: SharedPromptBatch) -> torch.Tensor:
    """Reward-model scores ``(n,)`` (float32): the score head at each response's last token, each prompt
    encoded once for all of its responses. ``model`` is an ``AutoModelForSequenceClassification`` with one
    label (its own pooled output is not used: it would read one position per row)."""
    hidden = shared_prompt_hidden(model, batch)
    head = score_head(model)
    return head(hidden[batch.last])[:, 0].float()


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The score head of a sequence-classification model (through DDP and PEFT wrappers)."""
    inner = extract_model_from_parallel(model)
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no score head")
    return head
