"""Offline mode: a hub id fails at once with a clear message and no connection is attempted; cached hub models
and local folders still load. A socket guard records (and refuses) every connection attempt, so each test
proves that none was made, not just that the call failed.

(Without offline mode the same uncached hub id takes ~45 s of retried connections before failing: that is
what offline mode exists to avoid, and is why no test here times the online path.)"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time

import huggingface_hub.constants as hub_constants
import pytest

from alignlab.cli import main as cli_main
from alignlab.errors import AlignlabError
from alignlab.models import load_model, load_tokenizer, offline_mode, resolve_model, set_offline

HUB_ID = "someone-who-does-not-exist/no-such-model"


@pytest.fixture
def attempts(monkeypatch) -> list:
    """Refuse (and record) every outgoing connection, and start from online mode: no offline variable, and
    the hub library's import-time copy of it off too (as when the variable is set after import)."""
    seen: list = []

    def guard(*args, **kwargs):
        seen.append(args)
        raise ConnectionRefusedError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")  # restored after the test, whatever set_offline writes
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", datasets_config.HF_HUB_OFFLINE)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", datasets_config.HF_DATASETS_OFFLINE)
    assert not offline_mode()
    return seen


def test_the_guard_catches_connections(attempts):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("huggingface.co", 443))
    assert len(attempts) == 1


@pytest.mark.parametrize("how", ["set_offline", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_hub_id_fails_fast_without_a_connection(attempts, monkeypatch, how):
    if how == "set_offline":
        set_offline(True)
        assert hub_constants.HF_HUB_OFFLINE  # the hub library's import-time copy follows
    else:
        monkeypatch.setenv(how, "1")  # set after import: still honoured, every load reads it
    assert offline_mode()
    for load in (load_tokenizer, load_model, lambda name: load_model(name, head="score")):
        start = time.perf_counter()
        with pytest.raises(AlignlabError, match="offline mode is on.*nor in the local Hugging Face cache") as e:
            load(HUB_ID)
        assert time.perf_counter() - start < 1.0
        assert HUB_ID in str(e.value) and "tiny-random" in str(e.value)  # names the offline alternatives
    assert attempts == []


def test_offline_config_option_on_the_command_line(attempts, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4))
    start = time.perf_counter()
    code = cli_main(["sft", f"model={HUB_ID}", f"data={data}", f"output_dir={tmp_path / 'run'}", "offline=true",
                     "progress=false"])
    assert code == 2
    assert "offline mode is on" in capsys.readouterr().err
    assert time.perf_counter() - start < 10.0
    assert attempts == []


def test_offline_still_loads_local_folders_and_cached_hub_models(attempts, monkeypatch, tmp_path):
    set_offline(True)
    folder = resolve_model("tiny-random")
    assert load_model(folder) is not None
    # a hub id already in the Hugging Face cache (laid out as the hub library writes it) loads with no network
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(folder, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_tokenizer("someorg/tiny").pad_token is not None
    assert load_model("someorg/tiny").config.hidden_size == 64
    assert attempts == []
