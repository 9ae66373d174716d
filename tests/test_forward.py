"""The aligned batch layout: the completion-only LM head gives the same log-probs as a full forward."""

from __future__ import annotations

import pytest
import torch

from alignlab.models import load_model
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


def test_loss_rows_logps_equal_aligned_logps_in_value_and_gradient(tiny_tokenizer):
    """DPO's head-on-loss-rows log-probs (chunked, checkpointed) equal the aligned layout's, with gradients."""
    from alignlab.train.forward import collate_right, loss_rows_logps

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
            per_token = loss_rows_logps(model, collate_right(seqs, labels, pad), chunk_rows=2)
        sums = per_token.sum(-1)
        (sums * weights).sum().backward()
        results.append((sums.detach(), [p.grad.clone() for p in model.parameters()]))
    (sa, ga), (sb, gb) = results
    assert torch.allclose(sa, sb, atol=1e-5)
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # no checkpointing without gradients; same numbers
        assert torch.allclose(loss_rows_logps(model, collate_right(seqs, labels, pad)).sum(-1), sb, atol=1e-5)
