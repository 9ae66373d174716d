"""The lab's stage cache: each stage's folder holds ``stage.json`` with a key (a hash of the stage's parameters,
the keys of the stages it reads and the alignlab version); a rerun reuses a stage whose key matches and
recomputes it (and what depends on it) when anything changed. Time and peak memory are measured around each
stage (peak RSS is reset before each stage through ``/proc/self/clear_refs``)."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab import __version__
from alignlab.config import LabConfig

# ----------------------------------------------------------------------------------------------- memory


def _trim_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); a no-op elsewhere."""
    _trim_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS since the last reset, in MiB (VmHWM), else the process's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- stages


class Lab:
    """Runs stages with caching and keeps their results."""

    def __init__(self, cfg: LabConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.output_root) / cfg.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}
        # called with (name, result, cached) after each stage, e.g. to advance a study's progress bar
        self.after_stage: Callable[[str, dict[str, Any], bool], None] | None = None

    def stage(self, name: str, params: dict[str, Any], after: list[str], fn: Callable[[Path], dict]) -> dict:
        """Run ``fn(folder)`` unless a finished stage with the same key exists. The key hashes ``params``,
        the keys of the stages in ``after`` and the alignlab version."""
        key_src = json.dumps({"params": params, "after": {a: self.keys[a] for a in after},
                              "version": __version__}, sort_keys=True, default=str)
        key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        folder = self.root / name
        marker = folder / "stage.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                print(f"[lab] {name}: cached ({folder})")
                self.keys[name], self.results[name] = key, saved["result"]
                self._after(name, saved["result"], cached=True)
                return saved["result"]
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        print(f"[lab] {name}: running")
        reset_peak_rss()
        start = time.perf_counter()
        result = fn(folder)
        result.setdefault("wall_s", time.perf_counter() - start)
        result.setdefault("peak_rss_mb", peak_rss_mb())
        # written whole or not at all: a run killed while writing leaves no marker a rerun would trust
        write_atomic(marker, json.dumps({"key": key, "params": params, "result": result}, indent=1, default=float))
        self.keys[name], self.results[name] = key, result
        print(f"[lab] {name}: done in {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MiB")
        self._after(name, result, cached=False)
        return result

    def _after(self, name: str, result: dict[str, Any], cached: bool) -> None:
        if self.after_stage is not None:
            self.after_stage(name, result, cached)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX): a
    reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
