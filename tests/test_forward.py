"""The aligned batch layout: the completion-only LM head gives the same log-probs as a full forward."""

from __future__ import annotations

import pytest
import torch

from alignlab.models import load_model, load_tokenizer
from alignlab.train.forward import collate_aligned, completion_logps


def test_aligned_logps_equal_full_forward(tiny_tokenizer):
    model = load_model("tiny-random").eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
    labels = [[-100, -100, -100, 8, 9, 10], [-100, 12, 13], [-100] * 6 + [20, 21]]
    batch = collate_aligned(seqs, labels, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        got = completion_logps(model, batch)
        for row, (ids, lab) in enumerate(zip(seqs, labels)):
            logits = model(torch.tensor([ids])).logits[0]
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            want = [float(lp) for lp, t in zip(logp, lab[1:]) if t != -100]
            have = got[row][batch.loss_mask[row]].tolist()
            assert len(have) == len(want)
            assert torch.allclose(torch.tensor(have), torch.tensor(want), atol=1e-5)


def test_kept_columns_cover_exactly_the_loss_tokens(tiny_tokenizer):
    seqs = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]]
    labels = [[-100, -100, 3, 4], [-100, -100, -100, -100, -100, 6, 7]]
    batch = collate_aligned(seqs, labels, pad_token_id=0)
    assert batch.keep == 2
    assert batch.targets.tolist() == [[3, 4], [6, 7]]
    assert batch.loss_mask.all()
    # position ids restart at 0 after left padding
    assert batch.position_ids[0].tolist()[-4:] == [0, 1, 2, 3]


def test_loss_rows_path_equals_aligned_path_in_loss_and_gradients(tiny_tokenizer):
    """SFT's head-on-loss-rows path (right padding, hidden states gathered) and the aligned path agree."""
    from alignlab.train.forward import collate_right, loss_rows_cross_entropy, sum_token_cross_entropy

    model = load_model("tiny-random").train()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
    labels = [[-100, -100, -100, 8, 9, 10], [-100, 12, 13], [-100] * 6 + [20, 21]]
    pad = tiny_tokenizer.pad_token_id
    right = collate_right(seqs, labels, pad)
    assert right.num_loss_tokens == 7 and right.input_ids.shape == (3, 8)
    grads = []
    for loss_fn, batch in [(sum_token_cross_entropy, collate_aligned(seqs, labels, pad)),
                           (loss_rows_cross_entropy, right)]:
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in model.parameters()]))
    (la, ga), (lb, gb) = grads
    assert lb == pytest.approx(la, rel=1e-6)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-6)
    # and the sum is the plain token NLL of a one-row forward
    with torch.no_grad():
        want = 0.0
        for ids, lab in zip(seqs, labels):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            want += float(torch.nn.functional.cross_entropy(logits, torch.tensor(lab[1:]), reduction="sum"))
    assert lb == pytest.approx(want, rel=1e-5)


def test_shared_prompt_logps_equal_aligned_logps_in_value_and_gradient(tiny_tokenizer):
    """DPO's log-probs (each prompt encoded once, the head on response rows in checkpointed chunks) equal the
    aligned layout's (FSDP's fallback), with gradients."""
    from alignlab.train.forward import collate_shared_prompt, shared_prompt_logps

    def shared(chunk_rows=1024):
        groups = [(ids[: lab.index(next(t for t in lab if t != -100))], [ids[lab.index(next(t for t in lab
                   if t != -100)):]]) for ids, lab in zip(seqs, labels)]
        return shared_prompt_logps(model, collate_shared_prompt(groups, pad), chunk_rows=chunk_rows)

    model = load_model("tiny-random").train()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
    labels = [[-100, -100, -100, 8, 9, 10], [-100, 12, 13], [-100] * 6 + [20, 21]]
    pad = tiny_tokenizer.pad_token_id
    weights = torch.tensor([1.0, -2.0, 0.5])
    results = []
    for kind in ("aligned", "rows"):
        model.zero_grad()
        if kind == "aligned":
            per_token = completion_logps(model, collate_aligned(seqs, labels, pad))
        else:  # chunks of 2 rows: several checkpointed chunks
            per_token = shared(chunk_rows=2)
        sums = per_token.sum(-1)
        (sums * weights).sum().backward()
        results.append((sums.detach(), [p.grad.clone() for p in model.parameters()]))
    (sa, ga), (sb, gb) = results
    assert torch.allclose(sa, sb, atol=1e-5)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # no checkpointing without gradients; same numbers
        assert torch.allclose(shared().sum(-1), sb, atol=1e-5)


# ------------------------------------------------------------------------------- shared prompts, each encoded once

GROUPS = [  # (prompt, responses): different prompt lengths, K from 1 to 3, an empty prompt, repeated tokens
    ([5, 6, 7, 8], [[9, 10, 11], [12], [13, 14]]),
    ([15, 16], [[17, 18, 19, 20, 21], [22, 23]]),
    ([], [[24, 25, 26], [27, 28]]),
    ([29, 30, 31], [[36]]),
]


def _separate(model, prompt, response):
    """Log-probs of ``response`` from the one sequence ``prompt + response`` run alone."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[max(0, len(prompt) - 1):]


def test_shared_prompt_layout_packs_and_masks():
    from alignlab.train.forward import collate_shared_prompt, pack_rows, split_shared_prefix

    assert pack_rows([7, 3, 4, 2, 5]) == [[0], [4, 3], [2, 1]]
    assert split_shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == ([1, 2], [[3, 4], [5], [3]])
    assert split_shared_prefix([[1, 2], [1, 2, 3]]) == ([1], [[2], [2, 3]])  # every suffix keeps a token
    batch = collate_shared_prompt(GROUPS, pad_token_id=0)
    widths = [4 + 6, 2 + 7, 0 + 5, 3 + 1]  # rows: [0], [1], [2, 3]
    assert batch.input_ids.shape == (3, 10) and batch.encoded == sum(widths)
    assert batch.tokens == 4 * 3 + 6 + 2 * 2 + 7 + 5 + 4
    assert batch.position_ids[2].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0]  # group 2, group 3, a pad
    mask = batch.attention_mask[:, 0]
    # row 0 is group 0: its second response (column 7) sees the prompt (0-3) and itself, not response 1 (4-6)
    assert mask[0, 7].nonzero().flatten().tolist() == [0, 1, 2, 3, 7]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 4, 5]
    assert (mask.sum(-1) > 0).all()  # every column, pads included, attends somewhere (no NaN rows)


def test_plan_segments_trades_prompt_copies_against_row_width():
    from alignlab.train.forward import attention_crossover, plan_segments

    groups = [(100, [10, 10, 10]), (150, [60, 60])]  # whole widths 130 and 270
    # attention free (huge crossover): fewest cells wins: each prompt once, rows of 270 (540 cells, not 630)
    segments, width = plan_segments(groups, crossover=10**9)
    assert sorted(segments) == [(0, [0, 1, 2]), (1, [0, 1])] and width == 270
    # attention dear: the long responses get a prompt copy each (rows of 210), the short ones still share theirs
    segments, width = plan_segments(groups, crossover=100)
    assert sorted(segments) == [(0, [0, 1, 2]), (1, [0]), (1, [1])] and width == 210
    assert plan_segments(groups, crossover=None)[0] == [(0, [0, 1, 2]), (1, [0, 1])]

    class Config:  # SmolLM2-135M
        hidden_size, num_attention_heads, num_key_value_heads, intermediate_size = 576, 9, 3, 1536

    assert 2000 < attention_crossover(Config()) < 3500


LAYOUTS = [  # one segment per group in packed rows; the narrowest rows; rows under eager attention (an additive
    # mask); segment attention, also with the layers recomputed in the backward; the plan as a 4D mask (eager)
    ("rows", {}), ("narrow", {"crossover": 1}), ("rows-eager", {}), ("segments", {"segments": True}),
    ("checkpointed", {"segments": True}), ("dense", {"segments": True}),
    # prompts sharing a preamble: the root encoded once (segment attention; and its plan as a 4D mask)
    ("root", {"segments": True}), ("root-dense", {"segments": True})]
PREAMBLE = [40, 41, 42, 43, 44]


@pytest.mark.parametrize(("name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_shared_prompt_logps_and_scores_equal_separate_sequences(tiny_tokenizer, name, layout):
    from alignlab.scoring import prepare_reward_tokenizer
    from alignlab.train.forward import (
        SEGMENT_ATTENTION,
        collate_shared_prompt,
        shared_prompt_logps,
        shared_prompt_scores,
    )

    torch.manual_seed(0)
    attn = "eager" if name in ("dense", "rows-eager", "root-dense") else "sdpa"  # eager gets the plan as a mask
    lm = load_model("tiny-random").train()  # train mode: gradients flow as in training
    lm.set_attn_implementation(attn)
    if name == "checkpointed":  # the recomputed layers must get the plan again
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = [*GROUPS, ([37, 38], [list(range(39, 47)), list(range(47, 55))])]
    if name.startswith("root"):  # every prompt starts with the preamble; one is the preamble and a single token
        groups = [(PREAMBLE + p, rs) for p, rs in groups if p] + [(PREAMBLE + [45], [[46, 47]])]
    batch = collate_shared_prompt(groups, tiny_tokenizer.pad_token_id, **layout)
    if name in ("segments", "checkpointed", "dense", "root", "root-dense"):  # one row, no padding
        assert batch.input_ids.shape == (1, batch.encoded) and batch.attention_mask is None
    if name.startswith("root"):  # the preamble once instead of once per group
        once = sum(len(p) + sum(len(r) for r in rs) for p, rs in groups) - (len(groups) - 1) * len(PREAMBLE)
        assert batch.encoded == once and batch.input_ids[0, : len(PREAMBLE)].tolist() == PREAMBLE
    if name == "narrow":  # the last group's long responses get a copy of their prompt each: rows of 10, not 18
        assert batch.input_ids.shape[1] == 10 and batch.encoded == batch.tokens - 2 * 3 - 2 - 2 * 1
    got = shared_prompt_logps(lm, batch)
    assert (lm.config._attn_implementation == SEGMENT_ATTENTION) == (name in ("segments", "checkpointed", "root"))
    got.sum().backward()
    shared_grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    i, total = 0, 0.0
    for prompt, responses in groups:
        for response in responses:
            want = _separate(lm, prompt, response)
            have = got[i][batch.mask[i]]
            assert torch.allclose(have, want, atol=1e-5), (i, have, want)
            total = total + want.sum()
            i += 1
    total.backward()
    for a, b in zip(shared_grads, [p.grad for p in lm.parameters()]):
        assert torch.allclose(a, b, atol=1e-5)

    tok = prepare_reward_tokenizer(load_tokenizer("tiny-random"))
    rm = load_model("tiny-random", head="score", tokenizer=tok).eval()
    rm.set_attn_implementation(attn)
    with torch.no_grad():
        scores = shared_prompt_scores(rm, collate_shared_prompt(groups, tok.pad_token_id, **layout)).tolist()
        want = [rm(torch.tensor([p + r])).logits[0, 0].item() for p, rs in groups for r in rs]
    assert scores == pytest.approx(want, abs=1e-5)
    assert len({round(s, 4) for s in scores}) == len(scores)
