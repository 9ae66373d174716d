"""The studio's web application (FastAPI): the page, its JSON API, and the security rules every request meets.

Security (the server shows text written by a model and typed by people):

- it binds 127.0.0.1 by default; on any other address a token is required (``?token=`` once, then a cookie, or
  the ``X-Studio-Token`` header), as Jupyter does;
- the ``Host`` header must name the server (no DNS rebinding);
- every state-changing request (POST) must carry the page's CSRF token in ``X-CSRF-Token``, be JSON, and come
  from the server's own origin when the browser says where it comes from;
- request bodies are limited to ``max_body`` bytes (413 beyond);
- model output and user text reach the page only as JSON that the script puts in ``textContent``; the page's
  HTML holds no data but escaped settings;
- no request parameter names a file: exports stream from the database, run folders get server-made names.
"""

from __future__ import annotations

import hmac
import html
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from alignlab.data.studio_db import Item, StudioDB, ranking_records, sft_records, trl_records
from alignlab.errors import AlignlabError
from alignlab.studio.jobs import JOB_KINDS, JobRunner, JobSettings
from alignlab.studio.sampler import Sampler
from alignlab.studio.stats import ab_result, agreement

LABELLER = re.compile(r"^[\w .@-]{1,40}$")
TAB = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BETTER = 20_000
_STATIC = {"studio.js": "text/javascript", "studio.css": "text/css"}
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class StudioSettings:
    """How the server runs: who labels by default, whether a token is needed, the body limit, training."""

    labeller: str = "me"
    token: str | None = None  # None: no token needed (a local bind)
    allowed_hosts: list[str] | None = None  # Host header names accepted (None: any, for tests)
    max_body: int = 64 * 1024
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    model: str = "smollm2-135m-instruct"
    train_steps: int = 10
    train_lr: float = 5e-5
    train_batch_size: int = 4


class Judgement(BaseModel):
    """A judgement posted by the page: one rank per answer (1 = best, equal = tie)."""

    item: int = Field(ge=1)
    labeller: str = Field(min_length=1, max_length=40)
    tiers: list[int] = Field(min_length=2, max_length=5)
    all_bad: bool = False
    better: str = Field(default="", max_length=MAX_BETTER)


class TrainRequest(BaseModel):
    """Start a training run of ``kind`` (see JOB_KINDS)."""

    kind: str = Field(max_length=20)
    steps: int | None = Field(default=None, ge=1, le=1000)
    lr: float | None = Field(default=None, gt=0, le=1e-2)


class ABRequest(BaseModel):
    """Start a blind A/B round between the starting model and a finished job's model."""

    job: str = Field(max_length=20)


def is_local(host: str) -> bool:
    """True for the loopback names (no token needed there)."""
    return host in _LOCAL_HOSTS


class Security:
    """Pure-ASGI middleware: Host check, token, body size limit, CSRF on state-changing requests."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: StudioSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        s = self.settings
        if s.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if name not in s.allowed_hosts:
                await _deny(send, 400, "unknown Host header")
                return
        set_cookie = False
        if s.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [None])[0] or headers.get("x-studio-token") or _cookie(headers)
            if not given or not hmac.compare_digest(given, s.token):
                await _deny(send, 403, "this studio needs its token: open the URL it printed (with ?token=...)")
                return
            set_cookie = (query.get("token") or [None])[0] is not None
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != headers.get("host", ""):
                await _deny(send, 403, "cross-site request refused")
                return
            if not hmac.compare_digest(headers.get("x-csrf-token", ""), s.csrf):
                await _deny(send, 403, "missing or wrong CSRF token: reload the page")
                return
            if not headers.get("content-type", "").startswith("application/json"):
                await _deny(send, 415, "send JSON (Content-Type: application/json)")
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > s.max_body):
            await _deny(send, 413, f"request body over {s.max_body} bytes")
            return
        seen, refused = 0, False

        async def limited_receive() -> dict[str, Any]:
            # a body without Content-Length (chunked) is counted as it arrives: past the limit the client gets
            # 413 at once and the application sees a disconnect (whatever it answers then is dropped)
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > s.max_body and not refused:
                    refused = True
                    await _deny(send, 413, f"request body over {s.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if refused:
                return
            if set_cookie and message["type"] == "http.response.start":
                cookie = f"studio_token={s.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _cookie(headers: dict[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "studio_token":
            return value
    return None


async def _deny(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _item_json(item: Item) -> dict[str, Any]:
    """What the page sees of an item: never which model wrote which answer."""
    prompt = item.prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else (
        [{"role": "user", "content": _alpaca(prompt)}] if isinstance(prompt, dict) else prompt)
    return {"id": item.id, "kind": item.kind, "messages": messages, "answers": item.answers,
            "unfinished": item.unfinished, "round": item.ab_round}


def _alpaca(prompt: dict[str, Any]) -> str:
    return str(prompt.get("instruction", "")) + (f"\n\n{prompt['input']}" if prompt.get("input") else "")


def _check_labeller(name: str) -> str:
    name = name.strip()
    if not LABELLER.match(name):
        raise AlignlabError("a labeller name is 1-40 letters, digits, spaces or . _ @ -", field="labeller")
    return name


def _check_tab(tab: str) -> str:
    if not TAB.match(tab):
        raise AlignlabError("a tab id is 1-64 letters, digits, _ or -", field="tab")
    return tab


def create_app(db: StudioDB, sampler: Sampler, jobs: JobRunner, settings: StudioSettings) -> FastAPI:
    """The studio's application around its store, sampler and job runner."""
    app = FastAPI(title="alignlab studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Security, settings=settings)
    static = resources.files("alignlab.studio") / "static"
    files = {name: (static / name).read_bytes() for name in [*_STATIC, "studio.html"]}

    @app.exception_handler(AlignlabError)
    async def _user_error(request: Request, error: AlignlabError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        values = {"csrf": settings.csrf, "labeller": settings.labeller, "k": str(sampler.settings.k),
                  "model": sampler.model_name, "kinds": json.dumps({k: v[0] for k, v in JOB_KINDS.items()}),
                  "steps": str(settings.train_steps), "lr": f"{settings.train_lr:g}"}
        text = files["studio.html"].decode()
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
        return HTMLResponse(text, headers={"Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                                           "style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in _STATIC:  # a fixed set: the name never reaches the filesystem
            return JSONResponse({"error": "no such file"}, status_code=404)
        return Response(files[name], media_type=_STATIC[name], headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/api/state")
    def state(labeller: str = Query(max_length=40)) -> dict[str, Any]:
        name = _check_labeller(labeller)
        rounds = [ab_result(db, r) | {"status": sampler.ab_status.get(r, "ready")} for r in db.ab_rounds()]
        return {"counts": db.counts(name), "sampler": sampler.status(), "agreement": agreement(db),
                "labellers": db.labellers(), "jobs": jobs.list(), "ab": rounds}

    @app.get("/api/next")
    def next_item(labeller: str = Query(max_length=40), tab: str = Query(max_length=64)) -> dict[str, Any]:
        name = _check_labeller(labeller)
        sampler.touch(name)
        item = db.claim_next(name, _check_tab(tab))
        return {"item": None if item is None else _item_json(item), "counts": db.counts(name),
                "sampler": sampler.status()}

    @app.get("/api/ab/next")
    def next_ab(labeller: str = Query(max_length=40), tab: str = Query(max_length=64),
                round: int = Query(ge=1)) -> dict[str, Any]:  # noqa: A002 - the API's word
        name = _check_labeller(labeller)
        if db.ab_round(round) is None:
            raise AlignlabError(f"no A/B round {round}", field="round")
        item = db.claim_next(name, _check_tab(tab), kind="ab", ab_round=round)
        return {"item": None if item is None else _item_json(item),
                "status": sampler.ab_status.get(round, "ready"), "result": ab_result(db, round)}

    @app.post("/api/judge")
    def judge(body: Judgement) -> dict[str, Any]:
        name = _check_labeller(body.labeller)
        new = db.judge(body.item, name, body.tiers, all_bad=body.all_bad, better=body.better)
        return {"ok": True, "new": new, "counts": db.counts(name)}

    @app.get("/api/export")
    def export(format: str = Query(pattern="^(ranking|trl|sft)$"),  # noqa: A002 - the API's word
               labeller: list[str] = Query(default=[])) -> StreamingResponse:
        names = [_check_labeller(n) for n in labeller] or None
        if format == "ranking":
            rows: Any = (record for _, record in ranking_records(db, labellers=names))
        elif format == "trl":
            rows = trl_records(db, labellers=names)
        else:
            rows = sft_records(db, labellers=names)
        suffix = "" if not names else "-" + "-".join(re.sub(r"[^A-Za-z0-9_-]", "_", n) for n in names)
        filename = f"studio-{format}{suffix}.jsonl"
        return StreamingResponse((json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                 media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.post("/api/train")
    def train(body: TrainRequest) -> dict[str, Any]:
        job = jobs.start(body.kind, JobSettings(
            model=settings.model, db=db.path, steps=body.steps or settings.train_steps,
            lr=body.lr or settings.train_lr, batch_size=settings.train_batch_size,
            max_new_tokens=sampler.settings.max_new_tokens))
        return {"ok": True, "job": job.progress()}

    @app.get("/api/jobs")
    def job_list() -> dict[str, Any]:
        return {"jobs": jobs.list()}

    @app.post("/api/ab")
    def start_ab(body: ABRequest) -> dict[str, Any]:
        job = jobs.get(body.job)
        if job is None:
            raise AlignlabError(f"no training run {body.job!r}", field="job")
        if not job.progress()["model_ready"]:
            raise AlignlabError(f"training run {job.id} has not finished with a model yet", field="job")
        round_id = db.add_ab_round(settings.model, str(job.final_model), job.id)
        sampler.request_ab(round_id, str(job.final_model))
        return {"ok": True, "round": round_id}

    @app.get("/api/ab/result")
    def ab(round: int = Query(ge=1)) -> dict[str, Any]:  # noqa: A002 - the API's word
        if db.ab_round(round) is None:
            raise AlignlabError(f"no A/B round {round}", field="round")
        return ab_result(db, round) | {"status": sampler.ab_status.get(round, "ready")}

    return app


def studio_url(host: str, port: int, token: str | None) -> str:
    """The URL to open (with the token when one is needed)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def allowed_hosts_for(host: str) -> list[str] | None:
    """The Host header names a server bound to ``host`` answers to (None: any name)."""
    if is_local(host):
        return list(_LOCAL_HOSTS)
    if host in ("0.0.0.0", "::"):
        return None  # any name: a wildcard bind is reached by names we cannot know; the token guards it
    return [host, *_LOCAL_HOSTS]


def runs_dir_for(db_path: Path) -> Path:
    """Where the studio's training runs go: ``<db name>-runs`` beside the database."""
    return db_path.with_name(db_path.stem + "-runs")
