"""Shared fixtures: the shared data folder, the tiny model, the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")

# Keep tests deterministic and quiet; never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.json from this run (only after an intended numerical change)")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): numbers that
    do not depend on how many cores the machine has, and the same as each 1-thread torchrun process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignlab.models import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2 checkpoint folder (converted once into the user cache)."""
    from alignlab.models import SMOLLM2, resolve_model

    return resolve_model(SMOLLM2)
