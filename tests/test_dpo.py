"""The DPO-family trainer: one concatenated forward, completion-only log-probs, the reference cache, learning on
a toy preference set, LoRA's frozen base, the length policy, every loss for two steps, KTO's mismatched rows."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import alignlab.train.dpo as dpo
from alignlab.config import DPOConfig
from alignlab.data.preference import PreferenceRecord, expand_to_pairs
from alignlab.data.tokenize import LONGER_THAN_MAX_LENGTH, PROMPT_FILLS_MAX_LENGTH, encode_prompt_completion
from alignlab.errors import AlignlabError
from alignlab.models import load_model, load_tokenizer, save_model
from alignlab.train.checkpoints import list_checkpoints
from alignlab.train.forward import collate_aligned, completion_logps
from alignlab.train.loop import NonFiniteError, Run

GOOD = ["great", "lovely", "happy", "wonderful", "good", "beautiful", "delightful"]
BAD = ["terrible", "boring", "awful", "hated", "long", "bad", "dull"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int, offset: int = 0) -> list[dict]:
    """Toy preferences: the chosen review is positive, the rejected one negative."""
    out = []
    for i in range(offset, offset + n):
        out.append({"prompt": f"Tell me about movie {i}.",
                    "chosen": f" The movie was {GOOD[i % 7]} and the music was {GOOD[(i + 3) % 7]}.",
                    "rejected": f" The movie was {BAD[i % 7]} and the music was {BAD[(i + 2) % 7]}."})
    return out


def _write(path: Path, records: list) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def _cfg(tmp_path: Path, name: str, **kw) -> DPOConfig:
    base = dict(model="tiny-random", output_dir=str(tmp_path / name), batch_size=4, lr=5e-3, precision="fp32",
                progress=False, warmup_ratio=0.0, schedule="constant", save_final=False, eval_fraction=0.0,
                max_steps=2, max_length=64)
    if "data" not in kw:
        base["data"] = _write(tmp_path / "pairs.json", _pairs(8))
    base.update(kw)
    return DPOConfig(**base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random").eval(), load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def fake_run():
    class FakeRun:
        device = torch.device("cpu")
        rank, world_size = 0, 1
        shards_weights = False

        class accelerator:  # noqa: N801 - mimics Run.accelerator
            @staticmethod
            def autocast():
                return torch.autocast("cpu", enabled=False)

            @staticmethod
            def unwrap_model(model):
                return model

    return FakeRun()


def _examples(tokenizer, n: int = 4) -> list[dpo.PairExample]:
    records = [PreferenceRecord(r["prompt"], [r["chosen"], r["rejected"]], record=i + 1) for i, r in
               enumerate(_pairs(n))]
    cfg = _cfg(Path("unused"), "unused", data="unused", template="none")
    examples, report = dpo.prepare_pairs(records, tokenizer, cfg)
    assert report.examples_kept == n
    return examples


# ------------------------------------------------------------------------------------------- the forward


def test_concatenated_forward_equals_two_forwards(tiny, fake_run):
    model, tokenizer = tiny
    pairs = _examples(tokenizer)
    cfg = _cfg(Path("unused"), "unused", data="unused", loss="simpo")
    with torch.no_grad():
        terms = dpo.pair_terms(cfg, model, pairs, None, tokenizer.pad_token_id, fake_run)
        rows = dpo.pair_rows(pairs)
        chosen = dpo.score_rows(model, rows[:4], tokenizer.pad_token_id, fake_run)[0].sum(-1)
        rejected = dpo.score_rows(model, rows[4:], tokenizer.pad_token_id, fake_run)[0].sum(-1)
    torch.testing.assert_close(terms["policy_chosen"], chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["policy_rejected"], rejected, rtol=1e-5, atol=1e-5)
    assert terms["chosen_lengths"].tolist() == [len(p.chosen_ids) for p in pairs]


def test_pairs_of_a_ranking_score_each_answer_once_with_the_same_losses_and_gradients(tiny, fake_run):
    model, tokenizer = tiny
    from alignlab.data.preference import expand_to_pairs

    rankings = [PreferenceRecord(f"Rate movie {i}.", [f" It was {GOOD[i]}.", " It was fine.", f" It was {BAD[i]}."],
                                 record=i + 1) for i in range(2)]
    cfg = _cfg(Path("unused"), "unused", data="unused", template="none")
    pairs, _ = dpo.prepare_pairs(expand_to_pairs(rankings), tokenizer, cfg)
    assert len(pairs) == 6 and dpo.ranking_units(pairs, True) == [[0, 1, 2], [3, 4, 5]]
    assert dpo.ranking_units(pairs, False) == [[i] for i in range(6)]
    rows, inverse = dpo.distinct_rows(dpo.pair_rows(pairs))
    assert len(rows) == 6 and [rows[i] for i in inverse] == dpo.pair_rows(pairs)
    table = {dpo.row_digest(*r): -float(k) for k, r in enumerate(rows)}  # a reference of known log-probs
    reference = dpo.Reference(table=table)

    def grads(terms):
        model.zero_grad()
        terms["losses"].sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shared = dpo.pair_terms(cfg, model, pairs, reference, tokenizer.pad_token_id, fake_run)
    shared_grads = grads(shared)
    separate = [dpo.pair_terms(cfg, model, [p], reference, tokenizer.pad_token_id, fake_run) for p in pairs]
    torch.testing.assert_close(shared["losses"], torch.cat([t["losses"] for t in separate]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared["reference_rejected"], torch.cat([t["reference_rejected"] for t in separate]))
    model.zero_grad()
    sum(t["losses"].sum() for t in separate).backward()
    for a, b in zip(shared_grads, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    assert shared["tokens"] < sum(t["tokens"] for t in separate) / 1.9  # 6 answers instead of 12 rows


def test_max_tokens_pieces_give_the_same_steps(tmp_path, monkeypatch):
    """A micro-batch cut into forward passes of at most ``max_tokens`` tokens trains exactly like the whole one."""
    forwards: list[int] = []
    real = dpo.pair_terms
    monkeypatch.setattr(dpo, "pair_terms", lambda cfg, model, chunk, *a: forwards.append(len(chunk))
                        or real(cfg, model, chunk, *a))
    whole = _metrics(dpo.train_dpo(_cfg(tmp_path, "whole", max_tokens=0)))
    assert forwards == [4, 4]
    forwards.clear()
    cut = _metrics(dpo.train_dpo(_cfg(tmp_path, "cut", max_tokens=40)))
    assert len(forwards) > 2 and sum(forwards) == 8
    for a, b in zip(whole, cut, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_unit_tokens_count_a_rankings_prompt_and_answers_once():
    a, b, c = [5, 6, 7], [8, 9], [10]
    pairs = [dpo.PairExample([1, 2], x, y, record=1) for x, y in ((a, b), (a, c), (b, c))]
    assert dpo.unit_tokens(pairs) == 2 + 3 + 2 + 1  # not 3 x (2 + ...) as separate pairs
    assert dpo.unit_tokens(pairs[:1]) == 2 + 3 + 2


def test_held_out_rankings_are_batched_whole_with_the_same_metrics(tmp_path):
    ranking = [{"prompt": f"Rate movie {i}.", "responses": [f" {GOOD[i % 7]}.", " Fine, I suppose.", f" {BAD[i % 7]}."]}
               for i in range(8)]
    data = _write(tmp_path / "rank.json", ranking)
    pairs = [dpo.PairExample([1], [2] * n, [3], record=r) for r, n in ((1, 3), (1, 1), (2, 2), (2, 1), (3, 1))]
    chunks = dpo.eval_chunks(pairs, 2, dpo.ranking_units(pairs, True))
    assert [[p.record for p in c] for c in chunks] == [[3, 2, 2], [1, 1]]  # whole rankings, shortest first
    assert [len(c) for c in dpo.eval_chunks(pairs, 2)] == [2, 2, 1]
    evals = {}
    for group in (True, False):  # lr 0: the same model scores the same held-out pairs, batched differently
        run = dpo.train_dpo(_cfg(tmp_path, f"g{group}", data=data, loss="simpo", lr=0.0, max_steps=1,
                                 eval_fraction=0.5, batch_size=2, group_rankings=group))
        evals[group] = {k: v for k, v in _metrics(run)[-1].items() if k.startswith("eval_")}
    assert evals[True].keys() == evals[False].keys() and "eval_loss" in evals[True]
    for key, value in evals[True].items():
        assert value == pytest.approx(evals[False][key], rel=1e-5, abs=1e-6), key


def test_completion_only_head_equals_full_forward_on_right_padded_batch(tiny):
    model, tokenizer = tiny
    rows = dpo.pair_rows(_examples(tokenizer))
    pad = tokenizer.pad_token_id
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(lab)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        target = labels[:, 1:]
        full = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        want = (full * (target != -100)).sum(-1)
        batch = collate_aligned([r[0] for r in rows], [r[1] for r in rows], pad)
        assert batch.keep < width - 1  # the head really skipped the prompt columns
        torch.testing.assert_close(completion_logps(model, batch).sum(-1), want, rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = completion_logps(model, batch)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.sum(-1), want, rtol=2e-2, atol=0.5)


# ------------------------------------------------------------------------------------------- reference cache


def test_reference_cache_reused_and_rebuilt(tmp_path, monkeypatch):
    calls = []
    compute = dpo.compute_reference_table

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(dpo, "compute_reference_table", counting)
    cache = tmp_path / "cache"
    kw = dict(precompute_ref=True, ref_cache_dir=str(cache))
    first = _metrics(dpo.train_dpo(_cfg(tmp_path, "a", **kw)))
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    # the cached log-probs are the reference's: the same run with the reference in memory logs the same
    live = _metrics(dpo.train_dpo(_cfg(tmp_path, "live")))
    for a, b in zip(first, live):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)

    dpo.train_dpo(_cfg(tmp_path, "b", **kw))  # nothing changed: reused
    assert len(calls) == 1 and len(list(cache.glob("*.safetensors"))) == 1

    other_data = _write(tmp_path / "more.json", _pairs(9))
    dpo.train_dpo(_cfg(tmp_path, "c", data=other_data, **kw))  # the data changed
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 2

    dpo.train_dpo(_cfg(tmp_path, "d", max_length=28, **kw))  # the tokenization changed (responses cut)
    assert len(calls) == 3

    model, tokenizer = load_model("tiny-random"), load_tokenizer("tiny-random")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    other_model = save_model(model, tokenizer, tmp_path / "other-model")
    dpo.train_dpo(_cfg(tmp_path, "e", reference=str(other_model), **kw))  # the reference weights changed
    assert len(calls) == 4 and len(list(cache.glob("*.safetensors"))) == 4
    dpo.train_dpo(_cfg(tmp_path, "f", reference=str(other_model), **kw))
    assert len(calls) == 4


# ------------------------------------------------------------------------------------------- learning


def _margins(model, pairs, pad, run) -> torch.Tensor:
    with torch.no_grad():
        logps = dpo.score_rows(model, dpo.pair_rows(pairs), pad, run)[0].sum(-1)
    return logps[: len(pairs)] - logps[len(pairs) :]


def test_dpo_raises_held_out_margin_and_accuracy(tmp_path, tiny, fake_run):
    model0, tokenizer = tiny
    held_out = _write(tmp_path / "held.json", _pairs(8, offset=100))
    cfg = _cfg(tmp_path, "learn", data=_write(tmp_path / "train.json", _pairs(32)), eval_data=held_out,
               max_steps=16, beta=0.1, save_final=True)
    run = dpo.train_dpo(cfg)
    last = _metrics(run)[-1]
    assert last["eval_rewards/margins"] > 0.5 and last["eval_rewards/accuracies"] == 1.0, last
    assert last["eval_kl"] > 0  # it moved away from the reference
    # before/after on the held-out pairs: the policy's own log-prob margin chosen - rejected
    records = [PreferenceRecord(r["prompt"], [r["chosen"], r["rejected"]], record=i + 1)
               for i, r in enumerate(_pairs(8, offset=100))]
    pairs, _ = dpo.prepare_pairs(records, tokenizer, cfg)
    before = _margins(model0, pairs, tokenizer.pad_token_id, fake_run)
    after = _margins(load_model(run / "final").eval(), pairs, tokenizer.pad_token_id, fake_run)
    assert (after > 0).float().mean() > (before > 0).float().mean()
    assert after.mean() > before.mean() + 5.0, (before.mean(), after.mean())


def test_lora_dpo_leaves_base_weights_unchanged(tmp_path, monkeypatch, tiny, fake_run):
    captured = {}
    monkeypatch.setattr(Run, "save_final", lambda self, model, tokenizer, **kw: captured.update(model=model))
    cfg = _cfg(tmp_path, "lora", lora=True, lora_r=4, lr=2e-2, max_steps=3)
    metrics = _metrics(dpo.train_dpo(cfg))
    assert metrics[-1]["rewards/margins"] > 0
    peft_model = captured["model"]
    original = load_model("tiny-random").state_dict()
    checked = 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param.detach(), original[key]), name
        checked += 1
    assert checked == len([k for k in original if k != "lm_head.weight"])  # tied to the embeddings
    assert any(float(p.detach().abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    # the reference (adapter disabled) is the untouched starting model
    model0, tokenizer = tiny
    pairs = _examples(tokenizer)
    rows = dpo.pair_rows(pairs)
    reference = dpo.Reference(adapter_of=peft_model)
    want = dpo.score_rows(model0, rows, tokenizer.pad_token_id, fake_run)[0].sum(-1)
    torch.testing.assert_close(reference.logps(rows, tokenizer.pad_token_id, fake_run), want)


# ------------------------------------------------------------------------------------------- every loss


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_each_loss_runs_two_steps(tmp_path, loss):
    extra = {"label_smoothing": 0.1} if loss in ("cdpo", "robust") else {}
    if loss == "dpo":
        extra = {"rpo_alpha": 0.5, "eval_fraction": 0.25}
    run = dpo.train_dpo(_cfg(tmp_path, loss, loss=loss, **extra))
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["grad_norm"] > 0
    if loss in ("dpo", "orpo"):
        assert "nll" in metrics[0]  # the SFT term is on
    if loss == "kto":
        assert "kl_reference_point" in metrics[0] and "rewards/accuracies" not in metrics[0]
    if loss == "dpo":
        assert "eval_loss" in metrics[-1]


def test_kto_on_feedback_with_lora_and_cached_reference(tmp_path):
    records = []
    for i, r in enumerate(_pairs(8)):
        records.append({"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"],
                        "label": bool(i % 3)})
    data = _write(tmp_path / "feedback.json", records)
    cfg = _cfg(tmp_path, "kto", data=data, loss="kto", lora=True, lora_r=4, precompute_ref=True,
               ref_cache_dir=str(tmp_path / "cache"), eval_fraction=0.25, undesirable_weight=1.5)
    metrics = _metrics(dpo.train_dpo(cfg))
    assert len(metrics) == 2 and "eval_loss" in metrics[-1]
    assert metrics[0]["kl_reference_point"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0
    with pytest.raises(AlignlabError, match="use --loss kto"):
        dpo.train_dpo(_cfg(tmp_path, "kto-as-dpo", data=data, loss="dpo"))


def test_kto_micro_batches_stay_whole_under_max_tokens(tmp_path):
    """KTO's reference point is a mean over each micro-batch's mismatched rows, so ``max_tokens`` must not cut one
    (cut to single examples, each would be paired with its own completion: a different loss by step 3)."""
    records = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
               for i, r in enumerate(_pairs(8))]
    cfg = _cfg(tmp_path, "kto", data=_write(tmp_path / "feedback.json", records), loss="kto", max_steps=3, lr=0.05)
    whole = _metrics(dpo.train_dpo(cfg))
    tight = _metrics(dpo.train_dpo(replace(cfg, output_dir=str(tmp_path / "kto-tight"), max_tokens=8)))
    assert whole[-1]["kl_reference_point"] > 1.0  # the policy has moved: the reference point matters
    for a, b in zip(whole, tight, strict=True):
        for key in ("loss", "kl_reference_point"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a["step"])


def test_kto_mismatched_rows_pair_each_prompt_with_the_previous_completion():
    examples = [dpo.FeedbackExample([1, i + 10], [100 + i, 2], bool(i % 2), i) for i in range(3)]
    rows = dpo.kl_rows(examples, max_length=64)
    assert [ids for ids, _ in rows] == [[1, 10, 102, 2], [1, 11, 100, 2], [1, 12, 101, 2]]
    assert rows[0][1] == [-100, -100, 102, 2]
    assert dpo.kl_rows(examples, max_length=3)[0][0] == [1, 10, 102]  # cut to max_length


# ------------------------------------------------------------------------------------------- data policy


def test_length_policy_counts_truncation_and_drops():
    fit = dpo.fit_lengths
    assert fit([1, 2], [[3, 4], [5]], max_length=8, max_prompt_length=0, truncation="right") == (
        [1, 2], [[3, 4], [5]], False)
    assert fit([1, 2], [[3, 4, 5, 6], [7]], max_length=4, max_prompt_length=0, truncation="right") == (
        [1, 2], [[3, 4], [7]], True)
    assert fit([1, 2], [[3, 4, 5, 6], [7]], max_length=4, max_prompt_length=0, truncation="drop") == (
        LONGER_THAN_MAX_LENGTH)
    assert fit([1, 2, 3, 4], [[5]], max_length=4, max_prompt_length=0, truncation="right") == PROMPT_FILLS_MAX_LENGTH
    # a long prompt keeps its end (and its first token, e.g. BOS)
    assert fit([0, 1, 2, 3, 4, 5], [[9]], max_length=16, max_prompt_length=3, truncation="right",
               keep_first=1) == ([0, 4, 5], [[9]], True)
    assert fit([0, 1, 2, 3], [[9]], max_length=16, max_prompt_length=3, truncation="drop") == dpo.PROMPT_TOO_LONG


def test_prepare_pairs_reports_cuts_and_identical_pairs(tmp_path):
    tokenizer = load_tokenizer("tiny-random")
    long_prompt = "Tell me about the movie. " * 20
    records = [
        PreferenceRecord("Tell me about movie 1.", [" It was great.", " It was awful."], record=1),
        PreferenceRecord(long_prompt, [" It was great.", " It was awful."], record=2),  # prompt fills max_length
        PreferenceRecord("Hi.", [" The movie" * 20 + " was great.", " The movie" * 20 + " was awful."],
                         record=3),  # the same after the cut
        PreferenceRecord("Hi.", [" Good" * 30, " Bad."], record=4),  # cut
    ]
    pairs, report = dpo.prepare_pairs(records, tokenizer, _cfg(tmp_path, "x", max_length=24, template="none"))
    assert [p.record for p in pairs] == [1, 4]
    assert report.truncated == 1 and pairs[1].truncated and len(pairs[1]) == 24
    assert report.dropped == {PROMPT_FILLS_MAX_LENGTH: 1, dpo.SAME_AFTER_TRUNCATION: 1}
    assert all(p.chosen_ids[-1] == tokenizer.eos_token_id for p in pairs[:1])


def test_unfinished_responses_are_trained_without_eos(tmp_path):
    """A response cut at a sampler's limit ends without EOS in DPO's pairs and in KTO's feedback (unpaired
    from the same ranking), and differs from the finished encoding by exactly that token."""
    tokenizer = load_tokenizer("tiny-random")
    eos = tokenizer.eos_token_id
    ranking = PreferenceRecord("Hi.", [" It was great and", " It was fine.", " It was awful and"], record=1,
                               unfinished=[True, False, True])
    cfg = _cfg(tmp_path, "x", template="none")
    pairs, _ = dpo.prepare_pairs(expand_to_pairs([ranking]), tokenizer, cfg)
    assert [(p.chosen_ids[-1] == eos, p.rejected_ids[-1] == eos) for p in pairs] == [
        (False, True), (False, False), (True, False)
    ]  # fmt: skip
    plain, _ = dpo.prepare_pairs(expand_to_pairs([PreferenceRecord("Hi.", ranking.responses, record=1)]),
                                 tokenizer, cfg)
    assert pairs[0].chosen_ids == plain[0].chosen_ids[:-1] and pairs[2].chosen_ids == plain[2].chosen_ids
    feedback, _ = dpo.prepare_feedback(dpo.unpair([ranking]), tokenizer, cfg)
    assert [(f.label, f.completion_ids[-1] == eos) for f in feedback] == [(True, False), (False, False)]


def test_bad_records_stop_or_are_counted(tmp_path, capsys):
    records = _pairs(8) + [{"prompt": "Hi.", "chosen": " Same.", "rejected": " Same."},
                           {"prompt": "Hi.", "chosen": "", "rejected": " No."}]
    data = _write(tmp_path / "bad.json", records)
    with pytest.raises(AlignlabError, match="record 9"):
        dpo.train_dpo(_cfg(tmp_path, "strict", data=data))
    dpo.train_dpo(_cfg(tmp_path, "lenient", data=data, skip_invalid=True, max_steps=1))
    out = capsys.readouterr().out
    assert "chosen equals rejected" in out and "empty response" in out


def test_rankings_become_pairs_and_config_errors(tmp_path, capsys):
    ranking = [{"prompt": f"Rate movie {i}.", "responses": [" Great.", " Fine.", " Awful."]} for i in range(4)]
    run = dpo.train_dpo(_cfg(tmp_path, "rank", data=_write(tmp_path / "rank.json", ranking), max_steps=3,
                             batch_size=2))
    assert "12 train (in 4 rankings)" in capsys.readouterr().out  # 4 rankings x 3 pairs
    steps = _metrics(run)
    assert len(steps) == 3
    # a step is 2 whole rankings (6 pairs): their 6 answers are scored once each, not as the 12 rows of 6 pairs
    tokenizer = load_tokenizer("tiny-random")
    answer_tokens = sum(len(p) + len(c) for p, c in (
        encode_prompt_completion(tokenizer, "Rate movie 0.", r, template="none") for r in ranking[0]["responses"]))
    assert [m["tokens"] for m in steps] == [2 * answer_tokens] * 3
    with pytest.raises(AlignlabError, match="label_smoothing"):
        dpo.train_dpo(_cfg(tmp_path, "cdpo", loss="cdpo"))
    with pytest.raises(AlignlabError, match="batch_size"):
        dpo.train_dpo(_cfg(tmp_path, "kto1", loss="kto", batch_size=1))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = dpo.preference_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses, chosen, rejected = real(*args, **kwargs)
        return (losses * float("nan") if len(calls) == 3 else losses), chosen, rejected

    monkeypatch.setattr(dpo, "preference_loss", poisoned)
    cfg = _cfg(tmp_path, "nan", max_steps=4, save_every=1)
    with pytest.raises(NonFiniteError, match="step-0000002"):
        dpo.train_dpo(cfg)
    assert [c.name for c in list_checkpoints(Path(cfg.output_dir) / "checkpoints")] == ["step-0000001",
                                                                                       "step-0000002"]


def test_resume_with_a_recomputed_reference_gives_the_same_losses(tmp_path):
    """A resumed run scores the reference with the untrained policy (before the checkpoint is loaded), so even
    with the cache gone it continues exactly where the straight run went."""
    kw = dict(max_steps=4, save_every=2, precompute_ref=True, data=_write(tmp_path / "p.json", _pairs(16)))
    straight = _metrics(dpo.train_dpo(_cfg(tmp_path, "straight", ref_cache_dir=str(tmp_path / "c1"), **kw)))
    cfg = _cfg(tmp_path, "killed", ref_cache_dir=str(tmp_path / "c2"), **kw)
    dpo.train_dpo(cfg)
    out = Path(cfg.output_dir)
    shutil.rmtree(list_checkpoints(out / "checkpoints")[-1])  # the run "died" after step 2
    shutil.rmtree(tmp_path / "c2")  # and the cache is gone
    kept = [m for m in _metrics(out) if m["step"] <= 2]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    resumed = _metrics(dpo.train_dpo(cfg))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)
