"""Checkpoint files: written atomically with checksums (a full disk leaves the previous checkpoint intact),
verified before use, listed newest first, and read back as weights, a run's config and RNG state. The training
loop (:mod:`alignlab.train.loop`) decides when; this module is how."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from alignlab.errors import AlignlabError


def rng_state() -> dict[str, Any]:
    """Every random stream, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                     state: dict, *, keep: int = 2) -> Path:
    """Write ``root/step-N`` via a temporary folder and a rename, with ``manifest.json`` (checksums) written
    last, so a reader sees either a whole checkpoint or none. Keeps the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        manifest = tmp / "manifest.json"
        with open(manifest, "w") as f:
            json.dump({"step": step, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:  # a full disk (OSError, or torch's RuntimeError around it), a quota, a vanished folder
        shutil.rmtree(tmp, ignore_errors=True)
        need = _nbytes(weights) + _nbytes(optimizer_state) + _nbytes(state)
        free = shutil.disk_usage(root).free if root.exists() else 0
        previous = list_checkpoints(root)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise AlignlabError(f"could not write checkpoint step-{step:07d} ({type(e).__name__}: {str(e)[:200]}); it "
                            f"needs about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free there; {kept} "
                            "and the partial one was removed. Free some space and rerun to resume",
                            file=str(root)) from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _nbytes(value: Any) -> int:
    """Bytes held by the tensors in a nested state (dicts, lists, tuples)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def load_trainable_weights(model: torch.nn.Module, checkpoint: Path, prefix: str = "") -> None:
    """Load a checkpoint's ``trainable.safetensors`` into ``model``, whose trainable parameters it must hold,
    all and only them (a clear error naming the checkpoint otherwise). ``prefix``: the model's name inside the
    module that was trained (PPO saves its policy as ``policy.`` beside the value head); other weights are left
    out."""
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    if prefix:
        weights = {name[len(prefix):]: w for name, w in weights.items() if name.startswith(prefix)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        _, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ (e.g. another LoRA rank)
        raise AlignlabError(f"the checkpoint does not fit this model: {e}", file=str(checkpoint)) from e
    if unexpected or not weights or trainable - set(weights):
        raise AlignlabError(f"the checkpoint does not fit this model (unexpected {sorted(unexpected)[:3]}, missing "
                            f"{sorted(trainable - set(weights))[:3]})", file=str(checkpoint))


def run_config(run_dir: str | Path, cls: type) -> Any:
    """The config (of dataclass ``cls``) a run was trained with, read back from its ``config.yaml``."""
    from alignlab.config import build_config

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise AlignlabError("no config.yaml: not a run folder", file=str(path))
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("stage", None)
    return build_config(cls, overrides=values)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is whole; otherwise what is wrong with it."""
    manifest = path / "manifest.json"
    if not manifest.exists():
        return "no manifest.json (the checkpoint was not finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def find_valid_checkpoint(root: Path, warn: Callable[..., Any] = print) -> Path | None:
    """The newest checkpoint that verifies; corrupted newer ones are reported and passed over."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"warning: checkpoint {path} is unusable: {problem}; trying the previous one")
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder (without verifying it)."""
    found = list_checkpoints(root)
    return found[-1] if found else None
