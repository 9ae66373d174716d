"""The command line: every command documents its options; configs, overrides and errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from alignlab.cli import STAGES, build_parser, main
from alignlab.config import SFTConfig, build_config
from alignlab.errors import AlignlabError


def _subcommands(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            yield from action.choices.items()


def test_every_option_has_help():
    parser = build_parser()
    seen = 0
    stack = list(_subcommands(parser))
    while stack:
        name, sub = stack.pop()
        stack.extend(_subcommands(sub))
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                seen += 1
    assert seen > 40


def test_help_lists_stage_options():
    out = subprocess.run([sys.executable, "-m", "alignlab.cli", "sft", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--lora", "--grad-accum", "--precision", "--resume", "--truncation", "--columns"):
        assert flag in out.stdout
    assert "sft" in STAGES


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 0.001\nbatch_size: 4\nmodel: tiny-random\n")
    cfg = build_config(SFTConfig, yaml_file=str(cfg_file), overrides={"batch_size": "2", "lora": "true"})
    assert cfg.lr == 0.001 and cfg.batch_size == 2 and cfg.lora is True


def test_bad_options_are_clear(tmp_path):
    with pytest.raises(AlignlabError, match="unknown option 'learning_rate'"):
        build_config(SFTConfig, overrides={"learning_rate": 1})
    with pytest.raises(AlignlabError, match="field 'batch_size': expected an integer"):
        build_config(SFTConfig, overrides={"batch_size": "2.5"})
    with pytest.raises(AlignlabError, match="not one of"):
        build_config(SFTConfig, overrides={"schedule": "exponential"})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1,\n")
    with pytest.raises(AlignlabError, match="invalid YAML"):
        build_config(SFTConfig, yaml_file=str(bad_yaml))


def test_cli_prints_errors_without_traceback(tmp_path, capsys):
    code = main(["sft", "--model", "tiny-random", "--data", str(tmp_path / "missing.json"),
                 f"output_dir={tmp_path / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "Traceback" not in err


def test_sft_then_generate_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": "yes"}) + "\n" for i in range(8)))
    assert main(["sft", "--model", "tiny-random", "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "max_steps=2", "batch_size=4", "progress=false", "eval_fraction=0"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    out_file = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tmp_path / "run" / "final"), "--template", "none", "--prompt", "Q1: ",
                 "--max-new-tokens", "4", "--output", str(out_file)]) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows[0]["prompt"] == "Q1: " and isinstance(rows[0]["response"], str)


def test_data_inspect_marks_loss_tokens(capsys):
    from pathlib import Path

    data = Path(__file__).parent / "_inspect.json"
    try:
        data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi there."}]))
        assert main(["data", "inspect", str(data), "-n", "1"]) == 0
    finally:
        data.unlink()
    out = capsys.readouterr().out
    assert "### Instruction:\nSay hi." in out
    assert "[[Hi there." in out
    assert "1 records read" in out or "records read" in out


def test_demo_quick_runs_the_whole_lab(tmp_path):
    import json

    assert main(["demo", "--quick", "--output-root", str(tmp_path), "progress=false"]) == 0
    root = tmp_path / "quick"
    rows = json.loads((root / "summary.json").read_text())
    assert [r["method"] for r in rows] == ["sft", "ppo", "ppo_nokl", "grpo", "rloo", "dpo", "ipo", "simpo", "rs",
                                          "bon"]
    assert "no value model" in rows[3]["models"] and "value" in rows[1]["models"]  # the critic GRPO does without
    for png in ("frontier.png", "overoptimization.png", "training.png", "costs.png"):
        assert (root / png).stat().st_size > 10_000
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    report = (root / "report.md").read_text()
    sft_gold = rows[0]["gold"]
    assert f"{sft_gold:.3f}" in report
    # 8 held-out prompts x 2 answers, intervals clustered by prompt; every method paired with SFT's answers
    sft_eval = json.loads((root / "eval_sft" / "stage.json").read_text())["result"]
    assert sft_eval["prompt_index"] == [j for j in range(8) for _ in range(2)] and len(sft_eval["proxy_scores"]) == 16
    assert "8 held-out prompts x 2 answers" in report and "Spearman" in report
    rho = sft_eval["gold_vader_spearman"]  # nan when the tiny model's answers all have one VADER score
    assert math.isnan(rho) or -1 <= rho <= 1
    for row in rows[1:]:
        assert row["target"] in ("yes", "no", "within noise") and row["vader"] is not None
        assert row["win_rate_lo"] <= row["win_rate"] <= row["win_rate_hi"], row["method"]
    bon = json.loads((root / "eval_bon" / "stage.json").read_text())["result"]
    assert bon["n"] == 16 and bon["prompt_index"] == sft_eval["prompt_index"]  # bon_n x 2 sampled, 2 kept a prompt
    # rejection sampling's second round samples from the first round's model; its budget counts both rounds
    rs = json.loads((root / "rs" / "stage.json").read_text())["result"]
    assert [r["round"] for r in rs["rounds"]] == [1, 2]
    assert rs["rounds"][1]["policy"] == str(root / "rs" / "run" / "round-1" / "sft" / "final")
    assert rs["samples"] == 8 * 3 * 2 and [r["samples"] for r in rs["rounds"]] == [8 * 3, 8 * 3]
    steps = [json.loads(line) for r in (1, 2) for line in (root / "rs" / "run" / f"round-{r}" / "sft" /
                                                           "metrics.jsonl").read_text().splitlines()]
    assert rs["optimizer_steps"] == len([m for m in steps if "loss" in m]) == 2 * 2
    by_round = ", ".join(f"{r['mean_score']:.2f}" for r in rs["rounds"])
    assert f"samples by round {by_round}, of the kept ones" in report
    # each trained method is also evaluated along training on the held-out prompts: its checkpoints (quick: 2 DPO
    # steps, 2 PPO iterations of 2 steps each; PPO at beta = 0 runs 3 and is checkpointed at each) or rejection
    # sampling's first round, then its final model
    for method, steps in (("dpo", [1, 2]), ("ipo", [1, 2]), ("simpo", [1, 2]), ("ppo", [2, 4]),
                          ("ppo_nokl", [2, 4, 6]), ("rs", [2, 4])):
        final = json.loads((root / f"eval_{method}" / "stage.json").read_text())["result"]
        curve = final["curve"]
        assert [c["step"] for c in curve] == steps, method
        assert all(math.isfinite(c[k]) for c in curve for k in ("gold", "kl", "proxy", "fluency_nll"))
        assert curve[0]["gold"] != final["gold"] or curve[0]["kl"] != final["kl"], method  # another model
        assert f"{steps[0]}: {curve[0]['gold']:.3f} at {curve[0]['kl']:.2f}" in report
    # Gao et al.'s view: the fitted forms per run and the verdicts, in the report and beside the summary
    assert "## Reward hacking (overoptimization)" in report and "![overoptimization](overoptimization.png)" in report
    over = json.loads((root / "overoptimization.json").read_text())
    assert set(over["runs"]) == {"ppo", "ppo_nokl", "bon"}
    nokl = over["runs"]["ppo_nokl"]["points"]  # the SFT model, 2 checkpoints, the end
    assert len(nokl) == 4 and nokl[0]["d"] == 0.0
    assert isinstance(over["gold_falls_while_proxy_rises"], bool) and isinstance(over["penalty_halves_kl"], bool)
    assert ("Without the KL penalty the gold turns" if over["gold_falls_while_proxy_rises"]
            else "this run does not show the fall") in report
    assert f"ends at KL {over['penalized_kl']:.1f} nats" in report
    assert json.loads((root / "ppo_nokl" / "stage.json").read_text())["result"]["samples"] == 3 * 8
    # a rerun reuses every stage
    before = (root / "sft" / "stage.json").stat().st_mtime_ns
    assert main(["demo", "--quick", "--output-root", str(tmp_path), "progress=false"]) == 0
    assert (root / "sft" / "stage.json").stat().st_mtime_ns == before
    # a changed reward model retrains what reads it (PPO, RS, BoN) and every evaluation (the proxy score), not
    # the methods that learn from the pairs alone
    stamps = {m: (root / m / "stage.json").stat().st_mtime_ns for m in ("dpo", "ppo", "rs", "eval_dpo")}
    assert main(["demo", "--quick", "--output-root", str(tmp_path), "progress=false", "rm_steps=4"]) == 0
    changed = {m: (root / m / "stage.json").stat().st_mtime_ns != t for m, t in stamps.items()}
    assert changed == {"dpo": False, "ppo": True, "rs": True, "eval_dpo": True}
