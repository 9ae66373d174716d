"""The studio's server through FastAPI's test client: every endpoint, bad and oversized input, concurrent
judgements, cross-site requests, model text that looks like HTML, the token of a non-local bind, and a real
training run (DPO, 2 steps on tiny-random) followed by a blind A/B round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from alignlab.cli import main  # noqa: E402
from alignlab.data.studio_db import StudioDB  # noqa: E402
from alignlab.studio.app import StudioSettings, allowed_hosts_for, create_app, studio_url  # noqa: E402
from alignlab.studio.jobs import JobRunner  # noqa: E402
from alignlab.studio.sampler import Sampler, SamplerSettings  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "Name a fruit.", "Describe the sea."]
XSS = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio")
    db = StudioDB(folder / "studio.sqlite")
    sampler = Sampler(db, "tiny-random", PROMPTS, SamplerSettings(k=2, max_new_tokens=6, ahead=2, ab_size=2),
                      "me")
    jobs = JobRunner(folder / "runs")
    settings = StudioSettings(labeller="me", allowed_hosts=["testserver"], max_body=4096, model="tiny-random",
                              train_steps=2, train_batch_size=2)
    app = create_app(db, sampler, jobs, settings)
    sampler.start()
    client = TestClient(app)
    deadline = time.time() + 120
    while db.pending("me") < 2:
        assert sampler.state != "error", sampler.error
        assert time.time() < deadline, "the sampler made no items"
        time.sleep(0.2)
    yield {"db": db, "sampler": sampler, "jobs": jobs, "settings": settings, "app": app, "client": client}
    sampler.stop()
    jobs.stop_all()


def next_item(client, labeller, tab):
    """The next item for ``labeller`` in ``tab``, waiting for the sampler when the queue is empty."""
    deadline = time.time() + 120
    while True:
        item = client.get("/api/next", params={"labeller": labeller, "tab": tab}).json()["item"]
        if item is not None:
            return item
        assert time.time() < deadline, "no item came"
        time.sleep(0.2)


def post(client, path, body, csrf, **headers):
    return client.post(path, content=json.dumps(body),
                       headers={"Content-Type": "application/json", "X-CSRF-Token": csrf, **headers})


def test_page_static_files_and_state(studio):
    client, csrf = studio["client"], studio["settings"].csrf
    page = client.get("/")
    assert page.status_code == 200 and f'content="{csrf}"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/studio.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/studio.css").status_code == 200
    for bad in ("/static/studio.html", "/static/..%2f..%2fpyproject.toml", "/static/..%2fapp.py"):
        assert client.get(bad).status_code == 404
    state = client.get("/api/state", params={"labeller": "me"}).json()
    assert state["sampler"]["state"] == "ready" and state["sampler"]["k"] == 2
    assert state["counts"]["pending"] >= 2 and state["jobs"] == []


def test_next_and_judge_count_exactly_and_store_settings(studio):
    client, db, csrf = studio["client"], studio["db"], studio["settings"].csrf
    first = next_item(client, "me", "t1")
    assert len(first["answers"]) == 2 and first["messages"][-1]["role"] == "user"
    assert "sources" not in first and "model" not in first  # the page never learns which model wrote what
    again = client.get("/api/next", params={"labeller": "me", "tab": "t1"}).json()["item"]
    other = next_item(client, "me", "t2")
    assert again["id"] == first["id"] and other["id"] != first["id"]
    before = db.counts("me")
    reply = post(client, "/api/judge", {"item": first["id"], "labeller": "me", "tiers": [2, 1],
                                        "better": "A better one."}, csrf)
    assert reply.status_code == 200 and reply.json()["new"] is True
    assert reply.json()["counts"]["labelled"] == before["labelled"] + 1
    item = db.item(first["id"])
    assert item.model == "tiny-random" and item.sampling["max_new_tokens"] == 6 and item.sampling["k"] == 2
    (judgement,) = [j for j in db.judgements(labellers=["me"]) if j["item"].id == first["id"]]
    assert judgement["tiers"] == [2, 1] and judgement["better"] == "A better one."


def test_bad_input_is_a_clear_error(studio):
    client, csrf = studio["client"], studio["settings"].csrf
    item = next_item(client, "me", "t1")["id"]
    wrong_length = post(client, "/api/judge", {"item": item, "labeller": "me", "tiers": [1, 2, 3]}, csrf)
    assert wrong_length.status_code == 400 and "one rank" in wrong_length.json()["error"]
    missing = post(client, "/api/judge", {"item": 99999, "labeller": "me", "tiers": [1, 2]}, csrf)
    assert missing.status_code == 400 and "no item 99999" in missing.json()["error"]
    bad_name = post(client, "/api/judge", {"item": item, "labeller": "<b>", "tiers": [1, 2]}, csrf)
    assert bad_name.status_code == 400 and "labeller" in bad_name.json()["error"]
    assert post(client, "/api/judge", {"item": "one", "labeller": "me", "tiers": [1, 2]}, csrf).status_code == 422
    assert client.get("/api/next", params={"labeller": "me", "tab": "../../etc"}).status_code == 400
    assert client.get("/api/export", params={"format": "../../etc/passwd"}).status_code == 422
    assert post(client, "/api/train", {"kind": "grpo"}, csrf).json()["error"].startswith("field 'kind'")
    assert post(client, "/api/train", {"kind": "dpo", "steps": 0}, csrf).status_code == 422
    assert post(client, "/api/ab", {"job": "job-999"}, csrf).status_code == 400
    assert client.get("/api/ab/result", params={"round": 999}).status_code == 400
    huge = post(client, "/api/judge", {"item": item, "labeller": "me", "tiers": [1, 2], "better": "x" * 5000}, csrf)
    assert huge.status_code == 413
    chunked = client.post("/api/judge", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]),
                          headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert studio["db"].counts("me")["labelled"] == len(studio["db"].judgements(labellers=["me"]))


def test_cross_site_requests_are_refused(studio):
    client, csrf = studio["client"], studio["settings"].csrf
    item = next_item(client, "eve", "t1")["id"]
    body = {"item": item, "labeller": "eve", "tiers": [1, 2]}
    assert post(client, "/api/judge", body, "wrong").status_code == 403
    no_token = client.post("/api/judge", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert no_token.status_code == 403
    form = client.post("/api/judge", content="item=1", headers={"Content-Type": "application/x-www-form-urlencoded",
                                                                 "X-CSRF-Token": csrf})
    assert form.status_code == 415
    assert post(client, "/api/judge", body, csrf, Origin="http://evil.example").status_code == 403
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
    assert studio["db"].counts("eve")["labelled"] == 0
    assert post(client, "/api/judge", body, csrf, Origin="http://testserver").status_code == 200


def test_model_text_that_looks_like_html_stays_text(studio):
    client, db, csrf = studio["client"], studio["db"], studio["settings"].csrf
    xss = db.add_item([{"role": "user", "content": XSS}], [XSS, "plain"], [False, False], ["m", "m"], model="m",
                      sampling={})
    for _ in range(50):  # judge this labeller's queue until the HTML-looking item comes up
        item = next_item(client, "xss", "t1")
        if item["id"] == xss:
            break
        post(client, "/api/judge", {"item": item["id"], "labeller": "xss", "tiers": [1, 2]}, csrf)
    reply = client.get("/api/next", params={"labeller": "xss", "tab": "t1"})
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["item"]["answers"][0] == XSS  # data, for textContent; the page holds no item HTML
    assert XSS not in client.get("/").text
    settings = StudioSettings(labeller='"><script>alert(1)</script>', allowed_hosts=None)
    page = TestClient(create_app(db, studio["sampler"], studio["jobs"], settings)).get("/").text
    assert "<script>alert(1)" not in page and "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_concurrent_judgements_from_several_clients(studio):
    db, csrf, app = studio["db"], studio["settings"].csrf, studio["app"]
    items = [db.add_item("p", [f"a{i}", f"b{i}"], [False, False], ["m", "m"], model="m", sampling={})
             for i in range(8)]

    def label(name):
        client = TestClient(app)
        codes = [post(client, "/api/judge", {"item": i, "labeller": name, "tiers": [1, 2] if i % 2 else [2, 1]},
                      csrf).status_code for i in items]
        codes.append(post(client, "/api/judge", {"item": items[0], "labeller": name, "tiers": [1, 1]},
                          csrf).status_code)  # the same item again (a second tab): replaced, not added
        return codes

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(label, [f"c{i}" for i in range(4)]))
    assert all(code == 200 for codes in results for code in codes)
    for i in range(4):
        mine = db.judgements(labellers=[f"c{i}"])
        assert len(mine) == 8 and {j["item"].id for j in mine} == set(items)
        assert [j["tiers"] for j in mine if j["item"].id == items[0]] == [[1, 1]]


def test_export_endpoints_filter_by_labeller(studio):
    client = studio["client"]
    ranking = client.get("/api/export", params={"format": "ranking", "labeller": ["c1"]})
    assert 'filename="studio-ranking-c1.jsonl"' in ranking.headers["content-disposition"]
    lines = [json.loads(line) for line in ranking.text.splitlines()]
    assert len(lines) == 7 and {r["labeller"] for r in lines} == {"c1"}  # item 0 was tied: it orders nothing
    trl = [json.loads(line) for line in client.get("/api/export", params={"format": "trl", "labeller": "c1"}).text
           .splitlines()]
    assert len(trl) == 7 and set(trl[0]) == {"prompt", "chosen", "rejected"}
    sft = [json.loads(line) for line in client.get("/api/export", params={"format": "sft"}).text.splitlines()]
    assert sft == [{"messages": [{"role": "user", "content": PROMPTS[0]},
                                 {"role": "assistant", "content": "A better one."}]}]
    everyone = client.get("/api/export", params={"format": "ranking"}).text.splitlines()
    assert len(everyone) > len(lines)


def test_train_from_the_page_then_a_blind_ab_round(studio):
    client, csrf = studio["client"], studio["settings"].csrf
    for _ in range(2):  # this test's own labels (the other tests' come on top when they ran first)
        item = next_item(client, "trainer", "t1")
        assert post(client, "/api/judge", {"item": item["id"], "labeller": "trainer", "tiers": [1, 2]},
                    csrf).status_code == 200
    started = post(client, "/api/train", {"kind": "dpo", "steps": 2}, csrf)
    assert started.status_code == 200, started.text
    job = started.json()["job"]["id"]
    assert post(client, "/api/train", {"kind": "dpo"}, csrf).json()["error"].startswith("a training run is still")
    deadline = time.time() + 240
    while True:
        (progress,) = [j for j in client.get("/api/jobs").json()["jobs"] if j["id"] == job]
        if progress["state"] != "running":
            break
        assert time.time() < deadline, progress
        time.sleep(0.5)
    assert progress["state"] == "done", progress["log_tail"]
    assert progress["step"] == 2 and progress["fraction"] == 1.0 and progress["model_ready"]
    assert "loss" in progress["metrics"] and "judgements ->" in progress["data"]

    round_id = post(client, "/api/ab", {"job": job}, csrf).json()["round"]
    votes = []
    deadline = time.time() + 120
    while len(votes) < 2:
        reply = client.get("/api/ab/next", params={"labeller": "me", "tab": "ab", "round": round_id}).json()
        if reply["item"] is None:
            assert "error" not in reply["status"] and time.time() < deadline, reply
            time.sleep(0.2)
            continue
        item = reply["item"]
        assert item["kind"] == "ab" and len(item["answers"]) == 2 and "sources" not in item
        tiers = [1, 2] if not votes else [1, 1]
        assert post(client, "/api/judge", {"item": item["id"], "labeller": "me", "tiers": tiers}, csrf).status_code \
            == 200
        votes.append(tiers)
    result = client.get("/api/ab/result", params={"round": round_id}).json()
    assert result["votes"] == 2 and result["ties"] == 1 and result["after_wins"] + result["before_wins"] == 1
    assert result["win_rate"] in (0.25, 0.75) and 0 <= result["low"] < result["win_rate"] < result["high"] <= 1
    assert result["status"] == "ready" and result["job"] == job


def test_cli_options_are_checked(capsys, tmp_path):
    assert main(["studio", "--k", "5"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["studio", "--temperature", "0"]) == 2
    assert main(["studio", "--labeller", "<me>"]) == 2
    assert main(["studio", "--prompts", str(tmp_path / "none.txt"), "--db", str(tmp_path / "s.sqlite")]) == 2
    assert "prompt file does not exist" in capsys.readouterr().err
    not_db = tmp_path / "x.sqlite"
    not_db.write_text("not a database")
    assert main(["studio", "--model", "tiny-random", "--db", str(not_db), "--port", "0"]) == 2
    assert "not an SQLite database" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["studio", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--prompts", "--db", "--host", "--port", "--k", "--labeller", "2-4"):
        assert option in text


def test_a_non_local_bind_needs_the_token(tmp_path):
    assert studio_url("127.0.0.1", 8000, None) == "http://127.0.0.1:8000/"
    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost", "::1"] and allowed_hosts_for("0.0.0.0") is None
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "alignlab.cli", "studio", "--model", "tiny-random", "--host", "0.0.0.0", "--port", "0",
         "--db", str(tmp_path / "s.sqlite"), "--max-new-tokens", "4", "--prompts", "task:sentiment:train"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while not any("open http" in line for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = next(line for line in lines if "open http" in line).split("open ", 1)[1].strip()
        assert "?token=" in url and any("reachable from other machines" in line for line in lines + [
            process.stdout.readline()])
        port = url.split(":")[2].split("/")[0]
        token = url.split("?token=")[1]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert refused.value.code == 403
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={token}", timeout=10) as page:
            assert page.status == 200 and "studio_token=" in page.headers["set-cookie"]
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/?token=wrong-token", timeout=10)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_finished_runs_of_an_earlier_session_are_listed(studio):
    runs = studio["jobs"].runs_dir
    done = [j for j in studio["jobs"].list() if j["state"] == "done"]
    assert done, "the training test runs first and leaves a finished run"
    again = JobRunner(runs).list()
    assert [(j["id"], j["kind"], j["state"], j["model_ready"], j["step"], j["total"]) for j in again] == \
        [(j["id"], j["kind"], j["state"], j["model_ready"], j["step"], j["total"]) for j in studio["jobs"].list()]
