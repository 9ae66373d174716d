"""DDP on CPU (gloo): every trainer launched with two processes gives the same run as one process with the same
global batch (two processes x batch b against one process x batch 2b), compared on the losses and gradient norms
each writes to ``metrics.jsonl``. SFT, PPO and rejection sampling are launched by ``torchrun``; the reward model and
DPO by ``accelerate launch`` with the shipped ``examples/accelerate/ddp.yaml`` (its multi-GPU launcher starts a gloo
group on CPU), so both launchers and the example config run here.

Tolerances: losses ``rel 1e-5``, gradient norms ``rel 1e-4`` (fp32; the two runs sum the same numbers in a
different order: per process and then all-reduced, against once; and a process pads its micro-batch to its
own longest row, so the matrix products see other shapes). The sampling trainers use deterministic sampling;
see their tests for why.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.cli import main as cli_main

LOSS_REL, GRAD_REL = 1e-5, 1e-4
DDP_YAML = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "ddp.yaml"
COMMON = ["model=tiny-random", "precision=fp32", "progress=false", "save_final=false", "warmup_ratio=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_both(stage: list[str], args: list[str], tmp_path: Path, *, batch: str = "batch_size", per_process: int = 2,
             launcher: str = "torchrun") -> tuple[Path, Path]:
    """Run ``alignlab STAGE ARGS`` twice: with 2 processes x ``batch=per_process`` (into ``tmp_path/ddp``) started
    by ``launcher`` (``torchrun``, or ``accelerate`` with ``examples/accelerate/ddp.yaml``), and in this process
    with 1 x ``2 * per_process`` (into ``tmp_path/single``)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(_free_port())]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_YAML),
                  "--num_processes", "2", "--main_process_port", str(_free_port())]
    cmd = [*launch, "-m", "alignlab.cli", *stage, f"output_dir={ddp}", f"{batch}={per_process}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "2 process(es)" in done.stdout + done.stderr
    assert cli_main([*stage, f"output_dir={single}", f"{batch}={2 * per_process}", *args]) == 0
    return ddp, single


def assert_same_metrics(ddp: list[dict], single: list[dict], keys: dict[str, float], steps: int) -> None:
    """Both runs logged ``steps`` lines and agree on every key, within its relative tolerance."""
    assert len(ddp) == len(single) == steps
    for a, b in zip(ddp, single):
        for key, rel in keys.items():
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (key, a["step"], a[key], b[key])


def _pairs(n: int) -> list[dict]:
    good = ["great", "wonderful", "lovely", "delightful", "beautiful", "happy", "good"]
    bad = ["awful", "terrible", "boring", "bad", "long", "sad", "dull"]
    return [{"prompt": f"Tell me about movie {i}.",
             "chosen": f" The movie was {good[i % 7]} and the music was {good[(i + 3) % 7]}{'!' * (i % 3)}",
             "rejected": f" The movie was {bad[i % 7]}{' and long' * (i % 4)}."} for i in range(n)]


# ----------------------------------------------------------------------------------------------- the trainers


def test_sft_two_processes_match_one(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([
        {"instruction": f"Say something nice number {i}.", "input": "", "output": f"The day is great {i}."}
        for i in range(32)
    ]))
    ddp, single = run_both(["sft"], [*COMMON, f"data={data}", "max_steps=3", "eval_fraction=0", "lr=1e-3"],
                           tmp_path)
    assert_same_metrics(_metrics(ddp), _metrics(single), {"loss": LOSS_REL, "grad_norm": GRAD_REL}, 3)


def test_reward_model_two_processes_match_one(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(_pairs(16)))
    ddp, single = run_both(["rm", "train"], [*COMMON, f"data={data}", "max_steps=3", "eval_fraction=0", "lr=3e-3",
                                             "stats_samples=4"], tmp_path, launcher="accelerate")
    assert_same_metrics(_metrics(ddp), _metrics(single),
                        {"loss": LOSS_REL, "accuracy": LOSS_REL, "reward_mean": GRAD_REL, "grad_norm": GRAD_REL}, 3)


def test_dpo_two_processes_match_one(tmp_path):
    """DPO with a frozen reference (a second copy of the model on every process)."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(_pairs(16)))
    ddp, single = run_both(["dpo"], [*COMMON, f"data={data}", "max_steps=3", "eval_fraction=0", "lr=5e-3",
                                     "max_length=64"], tmp_path, launcher="accelerate")
    assert_same_metrics(_metrics(ddp), _metrics(single),
                        {"loss": LOSS_REL, "rewards/margins": GRAD_REL, "kl": GRAD_REL, "grad_norm": GRAD_REL}, 3)


REWARD = '''
def variety(prompts, responses):
    """Distinct characters per character, plus a part from the prompt's length: scores that vary from sample to
    sample even for the random tiny model."""
    return [(len(p) % 5) / 5 + len(set(r)) / max(1, len(r)) for p, r in zip(prompts, responses)]
'''

WORDS = ["movie", "film", "story", "day", "sky", "fox", "dog", "music"]


def test_ppo_two_processes_match_one(tmp_path):
    """PPO's update phase under DDP equals one process's on the same rollouts.

    Why the rollouts are made deterministic (``top_k=1``): each process samples its share of the prompts with
    its own seed (seeded per (iteration, process), so runs resume exactly), and a batched ``multinomial`` draw
    depends on the whole batch, so sampled tokens can only match one process's if every sample had its own
    random stream (seeded per global sample). With temperature sampling the two runs are equal in distribution,
    not token for token. ``top_k=1`` keeps the log-probs at the sampling temperature (the PPO ratio, KL and
    entropy are still those of the full distribution) but makes each response the policy's argmax, so both runs
    roll out the same responses, and then everything after generation must match: scores, KL, advantages
    (whitened over the global rollout), values, losses and the clipped gradient, over two iterations (so the
    second rollout also comes from identical updated policies).
    """
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the {w}." for w in WORDS * 2) + "\n")
    ddp, single = run_both(["ppo"], [*COMMON, f"prompts={prompts}", f"reward={reward}:variety", "iterations=2",
                                     "ppo_epochs=2", "max_new_tokens=6", "top_k=1", "eval_fraction=0", "lr=5e-3",
                                     "log_samples=0", "schedule=constant"], tmp_path, per_process=4)
    keys = {"score": LOSS_REL, "kl": GRAD_REL, "reward": GRAD_REL, "entropy": LOSS_REL,
            "policy_loss": GRAD_REL, "value_loss": GRAD_REL, "approx_kl": 1e-3, "grad_norm": GRAD_REL,
            "response_length": LOSS_REL, "score_std": LOSS_REL, "explained_variance": GRAD_REL,
            "return_mean": GRAD_REL, "value_mean": GRAD_REL}
    assert_same_metrics(_metrics(ddp), _metrics(single), keys, 2)


def test_rejection_sampling_two_processes_match_one(tmp_path):
    """Rejection sampling: each process samples its share of the prompts (gathered back in prompt order), then
    every round's SFT runs under DDP.

    Sampling is greedy here (``temperature=0``) for the reason given in the PPO test: with temperature the
    processes draw other random numbers than one process would, so the kept set is equal in distribution only.
    Greedy samples do not depend on that, so the kept data must be identical, and then the SFT phase of each of
    the two rounds (the second sampled from the first round's DDP-trained policy) must match.
    """
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the {w}." for w in WORDS) + "\n")
    ddp, single = run_both(["rs"], [*COMMON, f"prompts={prompts}", f"reward={reward}:variety", "rounds=2", "n=2",
                                    "temperature=0", "max_new_tokens=8", "max_steps=2", "eval_fraction=0",
                                    "lr=1e-3", "template=none", "save_final=true"], tmp_path)
    for r in (1, 2):
        assert (ddp / f"round-{r}" / "kept.jsonl").read_text() == (single / f"round-{r}" / "kept.jsonl").read_text()
        assert (ddp / f"round-{r}" / "samples.jsonl").read_text() == \
            (single / f"round-{r}" / "samples.jsonl").read_text()
        assert_same_metrics(_metrics(ddp / f"round-{r}" / "sft"), _metrics(single / f"round-{r}" / "sft"),
                            {"loss": LOSS_REL, "grad_norm": GRAD_REL}, 2)
