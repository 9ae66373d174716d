"""The aligned batch layout: the completion-only LM head gives the same log-probs as a full forward."""

from __future__ import annotations

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
