"""A run folder knows which run it holds, and holds one run at a time.

``run.json`` records the run's identity: the stage, a fingerprint (SHA-256) of every data file the options name,
and the options that change what is trained (not logging, checkpoint cadence or speed knobs). A rerun into the
folder resumes only when its identity matches; a different run is refused with the differences and the ways out
(``overwrite=true`` to start afresh, another ``output_dir``, or ``resume=latest``/a checkpoint path to continue the
folder's run anyway). Without this, a reused folder (the default ``runs/sft`` first of all) silently resumed an
unrelated run and trained nothing on the new data.

``.lock`` is an OS file lock (``flock``) held for the run's life: the kernel drops it when the process ends, however
it ends, so a lock left by a killed run is never in the way (its pid, still written in the file, is reported as
stale). A second run into a busy folder is refused at once, naming the holder's pid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

IDENTITY_FILE = "run.json"
LOCK_FILE = ".lock"

# Options that do not change what is trained: where and how often things are written, how a run is resumed, speed
# and memory knobs that give the same update, evaluation-only inputs. Every other option is part of the identity.
NOT_TRAINING = frozenset({
    "output_dir", "resume", "overwrite", "progress", "log_every", "eval_every", "save_every", "keep_checkpoints",
    "save_final", "merge_lora", "on_nan", "offline", "allow_pickle", "trust_remote_code", "max_tokens",
    "gradient_checkpointing", "precompute_ref", "ref_cache_dir", "eval_data", "eval_prompts", "eval_greedy",
    "log_samples", "stats_samples", "reward_batch_size", "eval_seed", "gold",
})

# What a run writes into its folder (removed by overwrite; nothing else in the folder is touched).
RUN_FILES = ("run.json", "config.yaml", "metrics.jsonl", "samples.jsonl", "eval_scores.jsonl", "eval_stats.json",
             "reward_hist.png")
RUN_DIRS = ("checkpoints", "final", "final.tmp", "tensorboard")


def file_fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise AlignlabError(f"could not read the file to fingerprint it: {e}", file=str(path)) from e
    return "sha256:" + h.hexdigest()


def run_identity(cfg: Any, stage: str) -> dict[str, Any]:
    """What makes this run this run: the stage, the training options, and the fingerprint of every file an
    option names (data files; a folder or hub id is identified by its name)."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAINING}
    files = {k: file_fingerprint(Path(v)) for k, v in options.items()
             if isinstance(v, str) and v and Path(v).is_file()}
    return {"stage": stage, "options": options, "files": files}


def identity_differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
                         ) -> list[str]:
    """What differs between two identities, in words (empty when they match). An option missing from ``old`` (one
    added to alignlab since that run) matches its value in ``defaults``."""
    if old.get("stage") != new.get("stage"):
        return [f"it holds a {old.get('stage')} run, this is {new.get('stage')}"]
    out = []
    a, b = old.get("options", {}), new.get("options", {})
    for key in sorted(set(a) | set(b)):
        if key not in a and defaults is not None and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')!r} there, {b.get(key, '<unset>')!r} now")
    fa, fb = old.get("files", {}), new.get("files", {})
    for key in sorted(set(fa) | set(fb)):
        if key in fa and key in fb and fa[key] != fb[key] and a.get(key) == b.get(key):
            out.append(f"{key}: the file {b.get(key)} has changed since")
    return out


def read_identity(folder: Path) -> dict[str, Any] | None:
    """The identity recorded in ``folder/run.json`` (None when there is none or it cannot be read)."""
    path = folder / IDENTITY_FILE
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def holds_a_run(folder: Path, parts: tuple[str, ...] = ()) -> bool:
    """True when ``folder`` holds what a run leaves behind: checkpoints, a final model, a metrics log, or a name
    matching one of ``parts`` (glob patterns of a stage's own outputs, e.g. rejection sampling's ``round-*``)."""
    checkpoints = folder / "checkpoints"
    return ((checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()))
            or (folder / "final").exists() or (folder / "metrics.jsonl").exists()
            or any(any(folder.glob(pattern)) for pattern in parts))


def clear_run(folder: Path, parts: tuple[str, ...] = ()) -> list[str]:
    """Remove what a run wrote into ``folder`` (only the names in ``RUN_FILES``/``RUN_DIRS`` and matching
    ``parts``); returns them."""
    removed = []
    for name in RUN_FILES:
        if (folder / name).exists():
            (folder / name).unlink()
            removed.append(name)
    doomed = [folder / name for name in RUN_DIRS] + [p for pattern in parts for p in sorted(folder.glob(pattern))]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path.name + "/")
        elif path.exists():
            path.unlink()
            removed.append(path.name)
    return removed


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- the lock

_HELD: dict[str, RunLock] = {}  # folder -> the lock this process holds on it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive ``flock`` on ``folder/.lock`` with the holder's pid written in the file."""

    def __init__(self, folder: Path, handle: Any, stale_pid: int | None) -> None:
        self.folder = folder
        self.handle = handle
        self.stale_pid = stale_pid

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        """Take the folder's lock, or raise naming the pid of the run that holds it."""
        folder.mkdir(parents=True, exist_ok=True)
        key = str(folder.resolve())
        earlier = _HELD.pop(key, None)
        if earlier is not None:  # an earlier run in this process that ended without closing (an exception)
            earlier.release()
        path = folder / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 - held open for the run's life
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().split()
                handle.close()
                who = f"pid {holder[0]}" if holder else "another process"
                raise AlignlabError(f"another run ({who}) is using this folder right now; wait for it to end, or "
                                    "choose another --output-dir", file=str(folder)) from None
        handle.seek(0)
        previous = handle.read().split()
        stale = int(previous[0]) if previous and previous[0].isdigit() and int(previous[0]) != os.getpid() else None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        handle.flush()
        lock = cls(folder, handle, stale if stale is not None and not _pid_alive(stale) else None)
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        """Empty the pid file and drop the lock (idempotent)."""
        if self.handle is None:
            return
        try:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
        except OSError:
            pass
        self.handle.close()  # closing the file drops the flock
        self.handle = None
        key = str(self.folder.resolve())
        if _HELD.get(key) is self:
            del _HELD[key]


def release_all() -> None:
    """Release every run lock this process holds (the CLI calls it on any exit)."""
    for lock in list(_HELD.values()):
        lock.release()


# ----------------------------------------------------------------------------------------------- opening a folder


def open_run_folder(cfg: Any, stage: str, note: Callable[[str], Any] = print, parts: tuple[str, ...] = ()) -> RunLock:
    """Lock ``cfg.output_dir`` and check it may hold this run, then record the run's identity.

    * an empty folder, or one holding the same run (stage, data, training options): go on (``resume=auto``
      resumes from its newest valid checkpoint);
    * ``overwrite=true`` or ``resume=never``: the folder's earlier run is removed first (said, not silent);
    * ``resume=latest`` or a checkpoint path: an explicit resume, allowed across differences (they are listed);
    * otherwise a folder holding another run is an error that lists the differences and the ways out.

    ``parts``: glob patterns of the stage's own outputs besides the usual ones (see :func:`holds_a_run`).
    """
    folder = Path(cfg.output_dir)
    lock = RunLock.acquire(folder)
    try:
        if lock.stale_pid is not None:
            note(f"note: {folder} was locked by pid {lock.stale_pid}, which is no longer running (a killed run); "
                 "the stale lock is taken over")
        identity = run_identity(cfg, stage)
        if holds_a_run(folder, parts):
            old = read_identity(folder)
            defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
            differences = identity_differences(old, identity, defaults) if old is not None else \
                ["it holds a run with no run.json (another tool or an older alignlab), whose identity is unknown"]
            if getattr(cfg, "overwrite", False) or cfg.resume == "never":
                removed = clear_run(folder, parts)
                why = "overwrite=true" if getattr(cfg, "overwrite", False) else "resume=never"
                note(f"{why}: starting afresh in {folder} (removed the earlier run's {', '.join(removed)})")
            elif differences and cfg.resume == "auto":
                shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6
                                                      else "")
                raise AlignlabError(
                    f"this folder holds another run ({shown}). Nothing was changed. To start this run afresh here "
                    "pass --overwrite true (deletes that run's checkpoints, logs and final model), or choose another "
                    "--output-dir; to continue that run with these options anyway pass --resume latest (or a "
                    "checkpoint path)", file=str(folder))
            elif differences:
                note(f"note: resuming explicitly (resume={cfg.resume}) although the run differs: "
                     + "; ".join(differences[:6]))
        _write_json_atomic(folder / IDENTITY_FILE, identity)
    except BaseException:
        lock.release()
        raise
    return lock


def open_run_folder_everywhere(cfg: Any, stage: str, *, is_main: bool, world_size: int,
                               note: Callable[[str], Any] = print, parts: tuple[str, ...] = ()) -> RunLock | None:
    """:func:`open_run_folder` on the main process (returns its lock; None elsewhere); under several processes its
    verdict is broadcast, so every process raises the same error and none is left waiting for the others."""
    error, lock = None, None
    if is_main:
        try:
            lock = open_run_folder(cfg, stage, note=note, parts=parts)
        except AlignlabError as e:
            error = str(e)
    if world_size > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise AlignlabError(error)
    return lock
