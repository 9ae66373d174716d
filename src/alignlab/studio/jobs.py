"""Training runs started from the studio: each is a list of ``alignlab`` commands run one after another in a
background process, each writing its own run folder; progress is read from the folders' ``metrics.jsonl``.

A job kind is an entry of :data:`JOB_KINDS`: a title and a function that turns the settings into stages. A new
method is one more entry whose last stage writes the model that the A/B round compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlab.data.studio_db import StudioDB, StudioReport, ranking_records
from alignlab.errors import AlignlabError


@dataclass
class Stage:
    """One ``alignlab`` command of a job: its words, its run folder, and the step count it will reach."""

    name: str
    argv: list[str]
    output_dir: Path
    total: int


@dataclass
class JobSettings:
    """What a job trains: the starting model, the database, the number of optimizer steps (PPO: iterations)
    per stage, the learning rate, the micro-batch size and the longest answer PPO samples."""

    model: str
    db: Path
    steps: int = 10
    lr: float = 5e-5
    batch_size: int = 4
    max_new_tokens: int = 64


def _dpo(s: JobSettings, run: Path) -> list[Stage]:
    out = run / "dpo"
    return [Stage("dpo", ["dpo", "--model", s.model, "--data", str(s.db), "--output-dir", str(out),
                          "--max-steps", str(s.steps), "--lr", str(s.lr), "--batch-size", str(s.batch_size),
                          "--eval-fraction", "0", "--progress", "false", "--resume", "never"], out, s.steps)]


def _reward_model_stage(s: JobSettings, rm: Path) -> Stage:
    return Stage("reward model", ["rm", "train", "--model", s.model, "--data", str(s.db), "--output-dir", str(rm),
                                  "--max-steps", str(s.steps), "--batch-size", str(s.batch_size),
                                  "--eval-fraction", "0", "--progress", "false", "--resume", "never"], rm, s.steps)


def _rm_ppo(s: JobSettings, run: Path) -> list[Stage]:
    rm, ppo = run / "rm", run / "ppo"
    return [
        _reward_model_stage(s, rm),
        Stage("ppo", ["ppo", "--policy", s.model, "--reward-model", str(rm / "final"), "--prompts", str(s.db),
                      "--output-dir", str(ppo), "--iterations", str(s.steps), "--lr", str(s.lr),
                      "--batch-size", str(s.batch_size), "--max-new-tokens", str(s.max_new_tokens),
                      "--eval-fraction", "0", "--progress", "false", "--resume", "never"], ppo, s.steps),
    ]


def _rm_grpo(s: JobSettings, run: Path) -> list[Stage]:
    rm, grpo = run / "rm", run / "grpo"
    group = 4  # completions per prompt: the group baseline GRPO compares each answer with
    return [
        _reward_model_stage(s, rm),
        Stage("grpo", ["grpo", "--model", s.model, "--reward-model", str(rm / "final"), "--prompts", str(s.db),
                       "--output-dir", str(grpo), "--iterations", str(s.steps), "--lr", str(s.lr),
                       "--group-size", str(group), "--prompts-per-iteration", str(max(1, s.batch_size // group)),
                       "--batch-size", str(s.batch_size), "--max-new-tokens", str(s.max_new_tokens),
                       "--eval-fraction", "0", "--progress", "false", "--resume", "never"], grpo, s.steps),
    ]


# kind -> (title shown on the page, stages); the last stage's output_dir/final is the trained model
JOB_KINDS: dict[str, tuple[str, Callable[[JobSettings, Path], list[Stage]]]] = {
    "dpo": ("DPO on the rankings", _dpo),
    "rm_ppo": ("reward model, then PPO against it", _rm_ppo),
    "rm_grpo": ("reward model, then GRPO against it (no value model)", _rm_grpo),
}


@dataclass
class Job:
    """One training run: its stages, where it stands, and its log."""

    id: str
    kind: str
    folder: Path
    stages: list[Stage]
    data: str
    state: str = "running"  # running -> done | failed | stopped
    stage: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    returncode: int | None = None
    process: subprocess.Popen | None = None

    @property
    def final_model(self) -> Path:
        """The model the job trains (the last stage's ``final/``)."""
        return self.stages[-1].output_dir / "final"

    def progress(self) -> dict[str, Any]:
        """The state, the current stage and its last logged step and metrics, and the log's last lines."""
        stage = self.stages[min(self.stage, len(self.stages) - 1)]
        step, last = 0, {}
        for record in _metrics(stage.output_dir / "metrics.jsonl"):
            step, last = max(step, record["step"]), record
        done_stages = self.stage + (self.state == "done")
        fraction = min(1.0, (done_stages + (0 if self.state == "done" else min(step / max(stage.total, 1), 1.0)))
                       / len(self.stages))
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k in
                 ("loss", "accuracy", "rewards/accuracies", "rewards/margins", "score", "reward", "kl")}
        return {"id": self.id, "kind": self.kind, "title": JOB_KINDS[self.kind][0], "state": self.state,
                "stage": stage.name, "stage_index": min(self.stage, len(self.stages) - 1) + 1,
                "stages": len(self.stages), "step": step, "total": stage.total, "fraction": round(fraction, 4),
                "metrics": shown, "data": self.data, "started": self.started, "finished": self.finished,
                "log_tail": self.log_tail() if self.state == "failed" else "",
                "model_ready": self.state == "done" and self.final_model.is_dir()}

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of the job's log (what a failed command printed)."""
        log = self.folder / "log.txt"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The training records of a run's metrics.jsonl (lines with a step and no ``split``), in order."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "split" not in record:
            out.append(record)
    return out


def _logged_steps(path: Path) -> list[int]:
    return [record["step"] for record in _metrics(path)]


class JobRunner:
    """Runs one training job at a time in a background process; folders are ``runs_dir/job-NNN``.

    Args:
        runs_dir: where the jobs' folders go.
        command: the words that start ``alignlab`` (default: this Python running ``alignlab.cli``).
    """

    def __init__(self, runs_dir: Path, command: list[str] | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.command = command or [sys.executable, "-m", "alignlab.cli"]
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._load_finished()

    def _load_finished(self) -> None:
        """The runs of an earlier session (their folders), so their models can still be A/B-checked."""
        for folder in sorted(self.runs_dir.glob("job-[0-9]*")):
            kind = "rm_ppo" if (folder / "ppo").is_dir() else "dpo" if (folder / "dpo").is_dir() else None
            if kind is None:
                continue
            stages = JOB_KINDS[kind][1](JobSettings(model="", db=Path()), folder)
            job = Job(folder.name, kind, folder, stages, data="(an earlier session)", stage=len(stages) - 1)
            job.state = "done" if job.final_model.is_dir() else "stopped"
            for stage in stages:  # the step count each stage reached (its settings are not kept)
                stage.total = max(_logged_steps(stage.output_dir / "metrics.jsonl"), default=0)
            job.started = job.finished = folder.stat().st_mtime
            self.jobs[job.id] = job

    def start(self, kind: str, settings: JobSettings) -> Job:
        """Start a job of ``kind`` on what has been labelled so far.

        Raises:
            AlignlabError: an unknown kind, another job still running, or nothing usable labelled yet.
        """
        if kind not in JOB_KINDS:
            raise AlignlabError(f"unknown training kind {kind!r}; expected one of {', '.join(JOB_KINDS)}",
                                field="kind")
        report = StudioReport()
        for _ in ranking_records(StudioDB(settings.db), report=report):
            pass
        if report.rankings + report.pairs == 0:
            raise AlignlabError("nothing to train on yet: rank some answers first (a judgement where every answer "
                                "ties, with no better answer written, orders nothing)")
        with self._lock:
            if any(job.state == "running" for job in self.jobs.values()):
                raise AlignlabError("a training run is still going; wait for it to finish")
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            number = 1 + max((int(p.name[4:]) for p in self.runs_dir.glob("job-*") if p.name[4:].isdigit()),
                             default=0)
            folder = self.runs_dir / f"job-{number:03d}"
            folder.mkdir()
            job = Job(f"job-{number:03d}", kind, folder, JOB_KINDS[kind][1](settings, folder),
                      data=report.summary(settings.db.name))
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"studio-{job.id}", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the alignlab this server runs, also for the child
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(job.folder / "log.txt", "ab") as log:
            for index, stage in enumerate(job.stages):
                job.stage = index
                log.write(f"$ alignlab {' '.join(stage.argv)}\n".encode())
                log.flush()
                job.process = subprocess.Popen([*self.command, *stage.argv], stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                job.returncode = job.process.wait()
                if job.state == "stopped":
                    break
                if job.returncode != 0:
                    job.state = "failed"
                    break
            else:
                job.state = "done"
        job.finished = time.time()
        job.process = None

    def stop_all(self) -> None:
        """Stop every running job (its process group), as the server shuts down."""
        for job in self.jobs.values():
            process = job.process
            if job.state == "running" and process is not None and process.poll() is None:
                job.state = "stopped"
                try:
                    os.killpg(process.pid, 15)
                except ProcessLookupError:
                    pass

    def get(self, job_id: str) -> Job | None:
        """A job by id, or None."""
        return self.jobs.get(job_id)

    def list(self) -> list[dict[str, Any]]:
        """Every job's progress, newest first."""
        return [job.progress() for job in sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)]
