"""Nothing lost, nothing poisoned: run folders with an identity and a lock, a NaN guard on the weights, every option
checked against its declared range, corrupt and partial files as clear errors, and ``key=value`` words anywhere.

Each test reproduces one defect found by trying the CLI as a new user would (numbered as in the project's issue
"Nothing lost, nothing poisoned"); runs are in-process through ``alignlab.cli.main`` on the tiny model."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignlab.cli import STAGES, _import, main
from alignlab.config import SFTConfig, build_config, config_fields
from alignlab.errors import AlignlabError
from alignlab.train.checkpoints import list_checkpoints, verify_checkpoint

FAST = ["--model", "tiny-random", "batch_size=2", "eval_fraction=0", "progress=false", "precision=fp32"]


def _sft_data(path: Path, word: str = "Count", n: int = 12) -> Path:
    path.write_text(json.dumps([{"instruction": f"{word} to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                for i in range(1, n + 1)]))
    return path


def _sft(data: Path, out: Path, *words: str) -> list[str]:
    return ["sft", "--data", str(data), "--output-dir", str(out), *FAST, *words]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """``alignlab ARGV`` in this process: (exit code, stdout + stderr). argparse's own errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- 1. reused folders


def test_reused_folder_with_another_run_is_refused_not_resumed(tmp_path, capsys):
    a, b = _sft_data(tmp_path / "a.json"), _sft_data(tmp_path / "b.json", word="Recite")
    out = tmp_path / "runs" / "x"
    assert _run(_sft(a, out, "max_steps=4"), capsys)[0] == 0
    first = _weights(out / "final")
    config_before = (out / "config.yaml").read_text()

    code, text = _run(_sft(b, out, "max_steps=4", "lr=1e-3", "seed=3"), capsys)
    assert code == 2 and "Traceback" not in text
    assert "holds another run" in text and "--overwrite" in text and "lr" in text and "seed" in text
    assert "resumed from" not in text
    assert (out / "config.yaml").read_text() == config_before  # still names the run that made the model

    # the same run again resumes (nothing to do: it is finished) ...
    code, text = _run(_sft(a, out, "max_steps=4"), capsys)
    assert code == 0 and "resumed from" in text
    # ... a changed data file under the same name is another run
    _sft_data(a, word="Spell")
    code, text = _run(_sft(a, out, "max_steps=4"), capsys)
    assert code == 2 and "has changed" in text

    # --overwrite (a bare flag) starts afresh and trains on the new data
    code, text = _run(_sft(b, out, "--overwrite", "max_steps=4", "lr=1e-3", "seed=3"), capsys)
    assert code == 0 and "resumed from" not in text and "starting afresh" in text
    second = _weights(out / "final")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert "b.json" in (out / "config.yaml").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_dpo_into_an_sft_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(_sft(_sft_data(tmp_path / "a.json"), out, "max_steps=2"), capsys)[0] == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(6)))
    code, text = _run(["dpo", "--data", str(pairs), "--output-dir", str(out), *FAST, "max_steps=2"], capsys)
    assert code == 2 and "holds a sft run, this is dpo" in text and "Traceback" not in text
    assert (out / "config.yaml").read_text().startswith("stage: sft")


# ----------------------------------------------------------------------------------------------- 2. NaN guard


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder)).values())


def test_nan_guard_never_keeps_non_finite_weights(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "stop"
    # lr=1e300 is a valid number whose first update overflows every weight: the loss and gradient are finite
    code, text = _run(_sft(data, out, "max_steps=3", "save_every=1", "lr=1e300"), capsys)
    assert code == 2 and "non-finite" in text and "Traceback" not in text
    assert "no checkpoint was written before it" in text
    for ckpt in list_checkpoints(out / "checkpoints"):
        assert _all_finite(ckpt / "trainable.safetensors"), ckpt

    # skip: every such step is undone, so the final model is the (finite) starting model, and the skips are said
    code, text = _run(_sft(data, tmp_path / "skip", "max_steps=3", "save_every=1", "lr=1e300", "on_nan=skip"), capsys)
    assert code == 0 and "3 skipped so far" in text
    assert _all_finite(tmp_path / "skip" / "final" / "model.safetensors")


def test_resume_refuses_a_non_finite_checkpoint(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "run"
    assert _run(_sft(data, out, "max_steps=2", "save_every=1", "keep_checkpoints=0"), capsys)[0] == 0
    # a checkpoint poisoned by an earlier version (whole by its checksums, NaN inside)
    newest = list_checkpoints(out / "checkpoints")[-1]
    weights = load_file(str(newest / "trainable.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(newest / "trainable.safetensors"))
    manifest = json.loads((newest / "manifest.json").read_text())
    from alignlab.train.checkpoints import _sha256

    manifest["files"]["trainable.safetensors"] = _sha256(newest / "trainable.safetensors")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    code, text = _run(_sft(data, out, "max_steps=2", "save_every=1", "keep_checkpoints=0"), capsys)
    assert code == 2 and "non-finite" in text and newest.name in text and "Traceback" not in text
    # the earlier, finite checkpoint can be named explicitly
    earlier = list_checkpoints(out / "checkpoints")[0]
    code, text = _run(_sft(data, out, "max_steps=2", "save_every=1", f"resume={earlier}"), capsys)
    assert code == 0 and f"resumed from {earlier}" in text
    assert _all_finite(out / "final" / "model.safetensors")


# ------------------------------------------------------------------------------------------- 3. two runs, one folder


def test_a_second_run_into_a_busy_folder_is_refused_with_the_holders_pid(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "busy"
    argv = _sft(data, out, "max_steps=100000", "save_every=2", "lr=1e-3")
    log = tmp_path / "first.log"
    with open(log, "w") as sink:  # a file, not a pipe nobody reads
        first = subprocess.Popen([sys.executable, "-m", "alignlab.cli", *argv], stdout=sink, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        start = time.time()
        while not list(out.glob("checkpoints/step-*/manifest.json")):
            assert first.poll() is None and time.time() - start < 300, log.read_text()[-2000:]
            time.sleep(0.1)
        config = (out / "config.yaml").read_text()
        # the same command again, while the first still runs: refused at once, naming the first's pid (a run
        # that went ahead instead would train for ever: the alarm ends it)
        def too_long(*_):
            raise TimeoutError("the second run was not refused")

        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(120)
        try:
            code, text = _run(argv, capsys)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert code == 2 and f"pid {first.pid}" in text and "Traceback" not in text, text
        assert "resumed from" not in text and (out / "config.yaml").read_text() == config
    finally:
        first.kill()  # kill -9: the lock is never released by the process itself
        first.wait()
    # the first died holding the lock: it is stale, so the next run goes ahead and says whose it was
    code, text = _run(_sft(data, out, "--overwrite", "max_steps=2"), capsys)
    assert code == 0 and f"pid {first.pid}, which is no longer running" in text
    assert (out / ".lock").read_text() == ""  # released at the end
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ----------------------------------------------------------------------------------------------- 4. option checking

BAD_OPTIONS = [  # (stage, option, value) from the issue
    ("sft", "lr", "-1e-3"), ("sft", "batch_size", "0"), ("sft", "grad_accum", "0"), ("sft", "adam_beta1", "1.5"),
    ("sft", "lora_r", "0"), ("dpo", "beta", "-1"), ("sft", "epochs", "0"), ("sft", "max_steps", "-5"),
    ("sft", "warmup_ratio", "5"), ("sft", "max_grad_norm", "-1"), ("dpo", "desirable_weight", "-1"),
    ("ppo", "vf_coef", "-0.5"), ("sft", "lr", "inf"), ("sft", "lr", "nan"),
]


@pytest.mark.parametrize("stage,name,value", BAD_OPTIONS)
def test_bad_option_values_rejected_alike_by_cli_yaml_and_python(stage, name, value, tmp_path, capsys):
    cls = _import(STAGES[stage][1])
    code, text = _run([stage, f"{name}={value}", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "Traceback" not in text and f"'{name}'" in text
    assert not (tmp_path / "r").exists()  # refused before anything was made
    (tmp_path / "c.yaml").write_text(f"{name}: {value}\n")
    with pytest.raises(AlignlabError) as from_yaml:
        build_config(cls, yaml_file=str(tmp_path / "c.yaml"))
    with pytest.raises(AlignlabError) as from_python:
        cls(**{name: float(value) if "." in value or "e" in value or value in ("inf", "nan") else int(value)})
    assert str(from_yaml.value) == str(from_python.value) == text.strip().removeprefix("alignlab: error: ")


def test_help_shows_each_options_range(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "range: 0 <= x <= 1" in text and "range: >= 1" in text and "range: > 0" in text


def _bad_values(typ, metadata) -> list[str]:
    """Values outside what a field of type ``typ`` with ``metadata`` (choices, range) allows."""
    if typ is bool:
        return ["maybe"]
    if metadata.get("choices"):
        return ["no-such-choice"]
    if typ not in (int, float):
        return []
    bounds = metadata.get("range", {})
    out = ["abc", "nan"] if typ is float else ["1.5"]
    for key, step in (("ge", -1e-3 if typ is float else -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if key in bounds:
            v = bounds[key] + step
            out.append(str(int(v)) if typ is int else repr(float(v)))
    return out


def test_fuzz_every_trainers_options_with_bad_values(tmp_path, capsys):
    """Generated from the config dataclasses' declared types, choices and ranges: every bad value exits non-zero,
    with no traceback, naming the option."""
    from typing import get_type_hints

    tried = 0
    for stage, (_, cls_path, _) in STAGES.items():
        cls = _import(cls_path)
        hints = get_type_hints(cls)
        folder = [f"--{k.replace('_', '-')}" for k in ("output_dir", "output_root", "output") if k in hints][:1]
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if getattr(typ, "__args__", None) and type(None) in typ.__args__:
                typ = next(a for a in typ.__args__ if a is not type(None))
            for value in _bad_values(typ, f.metadata):
                argv = [*stage.split(), f"--{f.name.replace('_', '-')}", value, *folder, str(tmp_path / "r")]
                code, text = _run(argv, capsys)
                assert code != 0, (argv, text)
                assert "Traceback" not in text, (argv, text)
                assert f.name in text or f.name.replace("_", "-") in text, (argv, text)
                tried += 1
    # the plain commands' numeric options too
    for argv, name, values in ((["generate", "--prompt", "hi"], "max_new_tokens", ["0", "-3"]),
                               (["generate", "--prompt", "hi"], "temperature", ["-1", "nan", "inf"]),
                               (["generate", "--prompt", "hi"], "top_p", ["0", "1.5"]),
                               (["generate", "--prompt", "hi"], "batch_size", ["0"]),
                               (["data", "inspect", "x.json"], "max_length", ["0"]), (["data", "inspect", "x.json"],
                                                                                     "n", ["-1"])):
        for value in values:
            flag = "-n" if name == "n" else f"--{name.replace('_', '-')}"
            code, text = _run([*argv, flag, value], capsys)
            assert code == 2 and "Traceback" not in text and f"'{name}'" in text, (argv, name, value, text)
            tried += 1
    assert tried > 250
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- 5. corrupt files


def test_corrupt_gzip_is_a_clear_error_in_trainers_and_inspect(tmp_path, capsys):
    raw = gzip.compress(json.dumps([{"instruction": f"Q{i}", "input": "", "output": "A" * 50} for i in range(50)])
                        .encode())
    bad = bytearray(raw)
    for i in range(20, len(bad) - 20, 7):  # the header stays whole, the deflate body does not
        bad[i] ^= 0x5A
    path = tmp_path / "d.json.gz"
    path.write_bytes(bytes(bad))
    pairs = tmp_path / "p.jsonl.gz"
    pairs.write_bytes(bytes(bad))
    for argv, file in ((_sft(path, tmp_path / "r"), path), (["data", "inspect", str(path)], path),
                       (["dpo", "--data", str(pairs), "--output-dir", str(tmp_path / "r2"), *FAST], pairs),
                       (["rm", "train", "--data", str(pairs), "--output-dir", str(tmp_path / "r3"), *FAST], pairs)):
        code, text = _run(argv, capsys)
        assert code == 2 and "Traceback" not in text and f"{file}: the gzip file is corrupt" in text, text


def test_truncated_safetensors_and_missing_tokenizer_are_clear_errors(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    assert _run(_sft(data, tmp_path / "run", "max_steps=1"), capsys)[0] == 0
    final = tmp_path / "run" / "final"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in final.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (["generate", "--model", str(broken), "--prompt", "hi", "--max-new-tokens", "2"],
                 _sft(data, tmp_path / "r2", "max_steps=1") + ["--model", str(broken)]):
        code, text = _run(argv, capsys)
        assert code == 2 and "Traceback" not in text and "model.safetensors" in text and "incomplete" in text, text

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (final / name).exists():
            (no_tok / name).write_bytes((final / name).read_bytes())
    code, text = _run(["generate", "--model", str(no_tok), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "Traceback" not in text and "tokenizer" in text and str(no_tok) in text, text


def test_partial_last_metrics_line_on_resume(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "run"
    assert _run(_sft(data, out, "max_steps=2", "save_every=1"), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a run killed mid-write
    code, text = _run(_sft(data, out, "max_steps=2", "save_every=1"), capsys)
    assert code == 0 and "dropped 1 unreadable line" in text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_disk_full_during_a_checkpoint(tmp_path, capsys, monkeypatch):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "run"
    import alignlab.train.loop as loop

    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's optimizer state: part written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(loop.torch, "save", save_then_fill_the_disk)
    code, text = _run(_sft(data, out, "max_steps=3", "save_every=1"), capsys)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in text
    assert "could not write checkpoint step-0000002" in text and "No space left" in text and "MiB are free" in text
    assert "step-0000001 is intact" in text
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]  # no temporary folder left
    assert verify_checkpoint(out / "checkpoints" / "step-0000001") is None
    # a rerun once there is space resumes from the intact checkpoint
    code, text = _run(_sft(data, out, "max_steps=3", "save_every=1"), capsys)
    assert code == 0 and "step-0000001 (step 1)" in text


def test_disk_full_while_saving_the_final_model(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    code, text = _run(_sft(_sft_data(tmp_path / "a.json"), out, "max_steps=1"), capsys)
    assert code == 2 and "Traceback" not in text and "could not save the model" in text and "MiB are free" in text
    assert not (out / "final.tmp").exists() and not (out / "final").exists()
    assert verify_checkpoint(out / "checkpoints" / "step-0000001") is None  # the run's state is safe


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    out = tmp_path / "run"
    assert _run(_sft(data, out, "max_steps=2", "save_every=1"), capsys)[0] == 0
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "optimizer.pt").write_bytes(b"garbage")
    code, text = _run(_sft(data, out, "max_steps=2", "save_every=1"), capsys)
    assert code == 2 and "every checkpoint in this folder is unusable" in text and "--overwrite" in text
    code, text = _run(_sft(data, out, "max_steps=2", "save_every=1", "overwrite=true"), capsys)
    assert code == 0 and "resumed from" not in text


# ----------------------------------------------------------------------------------------------- 6. smaller


def test_key_value_words_after_an_option(tmp_path, capsys):
    data = _sft_data(tmp_path / "a.json")
    argv = ["sft", "max_steps=1", "--data", str(data), "batch_size=2", "--output-dir", str(tmp_path / "r"),
            "eval_fraction=0", "--lora", "lora_r=2", "progress=false", "precision=fp32", "--model", "tiny-random",
            "seed=5"]
    code, text = _run(argv, capsys)
    assert code == 0, text
    import yaml

    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (cfg["max_steps"], cfg["batch_size"], cfg["lora"], cfg["lora_r"], cfg["seed"]) == (1, 2, True, 2, 5)


def test_python_api_checks_ranges_too():
    with pytest.raises(AlignlabError, match="field 'grad_accum'.*>= 1"):
        SFTConfig(grad_accum=0)
    assert {name for name, *_ in config_fields(SFTConfig)} >= {"overwrite", "resume"}


def test_duplicates_and_held_out_overlap_are_counted_and_deduped(tmp_path, capsys):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
            for i in range(1, 11)]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(rows + rows[:3]))  # 3 exact duplicates
    held = tmp_path / "held.json"
    held.write_text(json.dumps(rows[3:5] + [{"instruction": "New one.", "input": "", "output": "yes"}]))
    common = [f"eval_data={held}", "max_steps=1", "eval_fraction=0"]
    code, text = _run(_sft(train, tmp_path / "keep", *common), capsys)
    assert code == 0
    assert "hygiene: 3 exact duplicates" in text and "(records 11, 12, 13)" in text
    assert "hygiene: 2 held-out examples identical to a training example" in text
    assert "13 train / 3 eval examples" in text

    code, text = _run(_sft(train, tmp_path / "dedupe", *common, "dedupe=true"), capsys)
    assert code == 0 and "dedupe dropped 5 of them" in text and "10 train / 1 eval examples" in text

    code, text = _run(["data", "inspect", str(train)], capsys)
    assert code == 0 and "hygiene: 3 exact duplicates" in text


def test_contradictory_feedback_and_pairs_are_flagged(tmp_path, capsys):
    from alignlab.data.hygiene import check_hygiene
    from alignlab.data.preference import FeedbackRecord, PreferenceRecord

    feedback = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"Q{i}?", "completion": "yes" if i % 2 else "no", "label": bool(i % 2)} for i in range(8)]
    rows.append({"prompt": "Q1?", "completion": "yes", "label": False})  # Q1 "yes" was desirable
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, text = _run(["data", "inspect", str(feedback)], capsys)
    assert code == 0 and "hygiene: 2 examples with contradictory labels" in text and "(records 2, 9)" in text
    code, text = _run(["dpo", "--data", str(feedback), "--output-dir", str(tmp_path / "kto"), *FAST, "loss=kto",
                       "max_steps=1", "dedupe=true"], capsys)
    assert code == 0 and "hygiene: 2 examples with contradictory labels" in text and "dedupe dropped 2" in text
    assert "7 train / 0 eval examples" in text

    pairs = [PreferenceRecord(prompt="Q", responses=["a", "b"], record=1),
             PreferenceRecord(prompt="Q", responses=["b", "a"], record=2),
             PreferenceRecord(prompt="R", responses=["a", "b"], record=3)]
    _, _, report = check_hygiene(pairs, [PreferenceRecord(prompt="R", responses=["a", "b"], record=1)])
    assert (report.contradictory, report.duplicates, report.overlap) == (2, 0, 1)
    kept, held, report = check_hygiene([FeedbackRecord(prompt="Q", completion="a", label=True, record=1)] * 2,
                                       dedupe=True)
    assert (len(kept), report.duplicates, report.dropped) == (1, 1, 1)
