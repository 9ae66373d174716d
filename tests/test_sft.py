"""The SFT trainer and the shared loop: learning, exact resume, accumulation invariance, checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignlab.config import SFTConfig
from alignlab.errors import AlignlabError
from alignlab.train.checkpoints import find_valid_checkpoint, list_checkpoints, run_config, verify_checkpoint
from alignlab.train.loop import lr_lambda
from alignlab.train.sft import train_sft


def _write_data(path: Path, n: int = 48) -> Path:
    words = ["great", "fine", "happy", "good", "lovely", "bright"]
    records = [
        {"instruction": f"Say something nice number {i}.", "input": "",
         "output": f"The day is {words[i % len(words)]} and the sun is {words[(i + 1) % len(words)]}."}
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cfg(tmp_path: Path, name: str, **kw) -> SFTConfig:
    base = dict(model="tiny-random", data=str(_write_data(tmp_path / "d.json")), output_dir=str(tmp_path / name),
                batch_size=4, lr=3e-3, precision="fp32", progress=False, eval_fraction=0.25, warmup_ratio=0.0,
                save_final=False)
    base.update(kw)
    return SFTConfig(**base)


def test_sft_lowers_held_out_loss(tmp_path):
    run = train_sft(_cfg(tmp_path, "learn", max_steps=30, eval_every=29))
    evals = [m["eval_loss"] for m in _metrics(run) if "eval_loss" in m]
    assert len(evals) == 2
    first_train = _metrics(run)[0]["loss"]
    assert evals[-1] < first_train - 1.0, (first_train, evals)


def test_resume_gives_the_same_losses(tmp_path):
    straight = _metrics(train_sft(_cfg(tmp_path, "straight", max_steps=8, save_every=4)))
    cfg = _cfg(tmp_path, "killed", max_steps=8, save_every=4)
    train_sft(cfg)
    # pretend the run died after step 4: drop the step-8 checkpoint and the metrics after step 4
    ckpts = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000004", "step-0000008"]
    shutil.rmtree(ckpts[-1])
    kept = [m for m in _metrics(Path(cfg.output_dir)) if m["step"] <= 4]
    (Path(cfg.output_dir) / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
    resumed = _metrics(train_sft(cfg))
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["lr"] == pytest.approx(b["lr"])


def test_a_fresh_run_in_a_used_folder_starts_its_logs_afresh(tmp_path):
    cfg = _cfg(tmp_path, "again", max_steps=3, eval_fraction=0, resume="never")
    first = _metrics(train_sft(cfg))
    second = _metrics(train_sft(cfg))
    assert [m["step"] for m in second] == [1, 2, 3]  # not appended to the first run's lines
    assert [m["loss"] for m in second] == pytest.approx([m["loss"] for m in first], rel=1e-6)


def test_batch_8_equals_batch_1_times_accumulation_8(tmp_path):
    one = _metrics(train_sft(_cfg(tmp_path, "b8", max_steps=3, batch_size=8, grad_accum=1, eval_fraction=0)))
    acc = _metrics(train_sft(_cfg(tmp_path, "b1x8", max_steps=3, batch_size=1, grad_accum=8, eval_fraction=0)))
    for a, b in zip(one, acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path):
    cfg = _cfg(tmp_path, "corrupt", max_steps=4, save_every=2)
    run = train_sft(cfg)
    ckpts = list_checkpoints(run / "checkpoints")
    newest = ckpts[-1] / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert "corrupted" in verify_checkpoint(ckpts[-1])
    warnings: list[str] = []
    assert find_valid_checkpoint(run / "checkpoints", warn=warnings.append) == ckpts[-2]
    assert warnings and "unusable" in warnings[0]


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    import alignlab.train.sft as sft

    real = sft.token_nll
    calls = {"n": 0}

    def poisoned(model, chunk, pad_token_id, run):
        calls["n"] += 1
        nll, tokens = real(model, chunk, pad_token_id, run)
        return (nll * float("nan") if calls["n"] >= 3 else nll), tokens

    monkeypatch.setattr(sft, "token_nll", poisoned)
    with pytest.raises(AlignlabError, match="loss is nan at step 2.*last good checkpoint"):
        train_sft(_cfg(tmp_path, "nan", max_steps=4, save_every=1, eval_fraction=0))
    assert find_valid_checkpoint(tmp_path / "nan" / "checkpoints") is not None


def test_nan_skip_counts_steps(tmp_path, monkeypatch):
    import alignlab.train.sft as sft

    real = sft.token_nll
    calls = {"n": 0}

    def poisoned(model, chunk, pad_token_id, run):
        calls["n"] += 1
        nll, tokens = real(model, chunk, pad_token_id, run)
        return (nll * float("nan") if calls["n"] == 2 else nll), tokens

    monkeypatch.setattr(sft, "token_nll", poisoned)
    run = train_sft(_cfg(tmp_path, "skip", max_steps=3, eval_fraction=0, on_nan="skip"))
    assert len(_metrics(run)) == 3


def test_missing_data_file_names_the_file(tmp_path):
    with pytest.raises(AlignlabError, match="nope.json"):
        train_sft(_cfg(tmp_path, "missing", data=str(tmp_path / "nope.json"), max_steps=1))


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_lambda(1, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(1.0)
    assert lr_lambda(2, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(1.0)
    assert lr_lambda(6, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_lambda(6, total_steps=10, warmup_steps=2, schedule="linear") == pytest.approx(0.5)
    assert lr_lambda(10, total_steps=10, warmup_steps=2, schedule="cosine") == pytest.approx(0.0)


def test_lora_sft_saves_a_merged_model(tmp_path):
    from alignlab.models import load_model

    run = train_sft(_cfg(tmp_path, "lora", max_steps=3, lora=True, lora_r=4, save_final=True, lr=1e-2))
    merged = load_model(run / "final")
    base = load_model("tiny-random")
    changed = any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert changed
    assert not any("lora" in k for k in merged.state_dict())


def test_a_lora_checkpoint_reads_back_as_the_model_it_held(tmp_path):
    from alignlab.models import load_model, load_tokenizer
    from alignlab.train.policy import policy_from_checkpoint

    cfg = _cfg(tmp_path, "ck", max_steps=3, lora=True, lora_r=4, save_final=True, lr=1e-2, save_every=1,
               keep_checkpoints=3)
    run = train_sft(cfg)
    tokenizer = load_tokenizer("tiny-random")
    checkpoints = list_checkpoints(run / "checkpoints")
    ids = torch.tensor([[1, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        final = load_model(run / "final")(ids).logits
        last = policy_from_checkpoint(run_config(run, SFTConfig), checkpoints[-1], tokenizer)  # as the run saw it
        assert not any("lora" in k for k in last.state_dict())  # merged, a plain model
        assert torch.allclose(last(ids).logits, final, atol=1e-5)
        first = policy_from_checkpoint(cfg, checkpoints[0], tokenizer)(ids).logits
        assert not torch.allclose(first, final, atol=1e-3)
    # a config that wraps the model differently (another rank) does not fit: an error naming the checkpoint
    with pytest.raises(AlignlabError, match="step-0000003"):
        policy_from_checkpoint(_cfg(tmp_path, "ck", lora=True, lora_r=8), checkpoints[-1], tokenizer)
    (checkpoints[0] / "trainable.safetensors").write_bytes(b"broken")
    with pytest.raises(AlignlabError, match="corrupted"):
        policy_from_checkpoint(cfg, checkpoints[0], tokenizer)


@pytest.mark.slow
def test_two_step_sft_of_the_real_model_saves_reloads_and_generates(tmp_path, smollm2_path):
    from alignlab.generation import SamplingConfig, generate
    from alignlab.models import load_model, load_tokenizer

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "What is the capital of France?", "input": "",
                                 "output": "The capital of France is Paris."}] * 4))
    cfg = SFTConfig(model="smollm2-135m-instruct", data=str(data), output_dir=str(tmp_path / "real"), max_steps=2,
                    batch_size=2, lr=1e-5, progress=False, eval_fraction=0, save_every=1)
    run = train_sft(cfg)
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-0000001", "step-0000002"]
    assert verify_checkpoint(list_checkpoints(run / "checkpoints")[-1]) is None
    model, tokenizer = load_model(run / "final"), load_tokenizer(run / "final")
    out = generate(model, tokenizer, ["What is the capital of France?"],
                   SamplingConfig(max_new_tokens=12, temperature=0.0), template="alpaca")
    assert "Paris" in out[0].text


def test_a_shared_preamble_is_encoded_once_with_the_same_loss_and_gradients(monkeypatch):
    """Examples that start with the same template preamble: the loss sums the same NLL with the same gradients
    as right-padded rows (1e-5), while the model embeds the preamble once (each example keeps one of its tokens)."""
    from types import SimpleNamespace

    import alignlab.train.sft as sft
    from alignlab.models import load_model

    torch.manual_seed(0)
    model = load_model("tiny-random").train()
    preamble = list(range(100, 100 + 2 * sft.SHARED_PREFIX_MIN))
    rows = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13, 14]), ([15, 16, 17, 18, 19], [20, 21, 22]),
            ([23, 24], [25, 26, 27, 28, 29])]
    chunk = [SimpleNamespace(input_ids=preamble + p + r, labels=[-100] * (len(preamble) + len(p)) + r)
             for p, r in rows]
    chunk[2].labels[-2] = -100  # a masked token inside a response (multi-turn chat data) stays masked
    run = SimpleNamespace(shards_weights=False, device="cpu")
    embedded = {"tokens": 0}
    model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: embedded.__setitem__("tokens", embedded["tokens"] + args[0].numel()))
    results = {}
    for name, minimum in (("shared", sft.SHARED_PREFIX_MIN), ("padded", 10**6)):
        monkeypatch.setattr(sft, "SHARED_PREFIX_MIN", minimum)
        model.zero_grad()
        embedded["tokens"] = 0
        nll, tokens = sft.token_nll(model, chunk, 0, run)
        nll.backward()
        results[name] = (float(nll), tokens, embedded["tokens"], [p.grad.clone() for p in model.parameters()])
    shared, padded = results["shared"], results["padded"]
    assert shared[0] == pytest.approx(padded[0], rel=1e-5) and shared[1] == padded[1]
    for a, b in zip(shared[3], padded[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert shared[2] == sum(len(e.input_ids) for e in chunk) - 3 * (len(preamble) - 1)  # the preamble once
    assert padded[2] == len(chunk) * max(len(e.input_ids) for e in chunk)
