"""``alignlab studio``: check the options, open the store, start the sampler, serve the page until Ctrl-C."""

from __future__ import annotations

import argparse
import secrets
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from alignlab.errors import AlignlabError

DEFAULT_PROMPTS = "builtin:instructions"


def add_studio_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``alignlab studio`` (each with its range)."""
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model to label and train: checkpoint folder, hub id or built-in name (default: "
                        "%(default)s)")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                        help="prompts to answer: .txt (one per line), any instruction/preference file, task:NAME:"
                        "train, or builtin:instructions (the built-in instruction prompts; default)")
    parser.add_argument("--db", default="studio.sqlite", metavar="FILE",
                        help="the SQLite store of judgements, created when missing; trainers read it with --data "
                        "(default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but 127.0.0.1/localhost/::1 requires a token in the URL "
                        "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765,
                        help="port, 0-65535; 0 = any free port (default: %(default)s)")
    parser.add_argument("--token", default=None,
                        help="the token a non-local bind requires (default: a random one, printed with the URL)")
    parser.add_argument("--k", type=int, default=2, help="answers per prompt to rank, 2-4 (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="longest sampled answer in tokens, 1-2048 (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature, > 0 and <= 5 (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="nucleus sampling, > 0 and <= 1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, >= 0 (default: %(default)s)")
    parser.add_argument("--ahead", type=int, default=3,
                        help="items kept sampled ahead of each active labeller, 1-50 (default: %(default)s)")
    parser.add_argument("--ab-size", type=int, default=10,
                        help="prompts in a blind A/B round, 1-500 (default: %(default)s)")
    parser.add_argument("--labeller", default="me",
                        help="default labeller name (each person sets their own on the page), 1-40 letters, digits, "
                        "spaces, . _ @ - (default: %(default)s)")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="default optimizer steps (PPO: iterations) of a training run, 1-1000 (default: "
                        "%(default)s)")
    parser.add_argument("--train-lr", type=float, default=5e-5,
                        help="default learning rate of a training run, > 0 and <= 0.01 (default: %(default)s)")
    parser.add_argument("--train-batch-size", type=int, default=4,
                        help="micro-batch size of a training run, 1-256 (default: %(default)s)")
    parser.add_argument("--max-body", type=int, default=65536,
                        help="largest request body in bytes, 1024-10485760 (default: %(default)s)")
    parser.add_argument("--export", choices=["ranking", "trl", "sft"], default=None,
                        help="instead of serving: write --db's judgements as the project's ranking JSONL, TRL's "
                        "preference JSONL, or the written better answers as SFT JSONL, to --output")
    parser.add_argument("--output", default="-", metavar="FILE",
                        help="where --export writes (default: - = standard output)")
    parser.add_argument("--only", action="append", default=[], metavar="LABELLER",
                        help="--export only this labeller's judgements (repeat for several; default: everyone)")


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise AlignlabError(message, field=option)


def load_studio_prompts(source: str) -> list[Any]:
    """The prompt list: ``builtin:instructions`` (the package's instruction prompts) or any prompt source."""
    from alignlab.tasks.loading import load_prompts

    if source == DEFAULT_PROMPTS:
        with resources.as_file(resources.files("alignlab.tasks") / "demo_instructions.json") as path:
            return load_prompts(path)
    return load_prompts(source)


def run_studio(args: argparse.Namespace) -> None:
    """Start the studio and serve until interrupted."""
    from alignlab.studio.app import LABELLER

    _check(2 <= args.k <= 4, "--k", f"must be 2-4, got {args.k}")
    _check(0 <= args.port <= 65535, "--port", f"must be 0-65535, got {args.port}")
    _check(1 <= args.max_new_tokens <= 2048, "--max-new-tokens", f"must be 1-2048, got {args.max_new_tokens}")
    _check(0 < args.temperature <= 5, "--temperature", f"must be > 0 and <= 5, got {args.temperature}")
    _check(0 < args.top_p <= 1, "--top-p", f"must be > 0 and <= 1, got {args.top_p}")
    _check(args.seed >= 0, "--seed", f"must be >= 0, got {args.seed}")
    _check(1 <= args.ahead <= 50, "--ahead", f"must be 1-50, got {args.ahead}")
    _check(1 <= args.ab_size <= 500, "--ab-size", f"must be 1-500, got {args.ab_size}")
    _check(bool(LABELLER.match(args.labeller)), "--labeller",
           "must be 1-40 letters, digits, spaces or . _ @ -")
    _check(1 <= args.train_steps <= 1000, "--train-steps", f"must be 1-1000, got {args.train_steps}")
    _check(0 < args.train_lr <= 1e-2, "--train-lr", f"must be > 0 and <= 0.01, got {args.train_lr}")
    _check(1 <= args.train_batch_size <= 256, "--train-batch-size", f"must be 1-256, got {args.train_batch_size}")
    _check(1024 <= args.max_body <= 10 * 1024 * 1024, "--max-body", f"must be 1024-10485760, got {args.max_body}")
    _check(args.token is None or len(args.token) >= 8, "--token", "must be at least 8 characters")
    if args.export:
        export(args.db, args.export, args.output, args.only)
        return
    try:
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise AlignlabError("the studio needs fastapi and uvicorn: pip install fastapi uvicorn") from error
    prompts = load_studio_prompts(args.prompts)
    serve(args, prompts)


def export(db_path: str, kind: str, output: str, labellers: list[str]) -> int:
    """Write a studio database's judgements as JSONL (``ranking``, ``trl`` or ``sft``); returns the line count.

    Raises:
        AlignlabError: a missing or foreign database, or an output that cannot be written.
    """
    import json
    import sys

    from alignlab.data.studio_db import StudioDB, StudioReport, ranking_records, sft_records, trl_records

    db = StudioDB(db_path, create=False)
    names = labellers or None
    report = StudioReport()
    if kind == "ranking":
        rows: Any = (record for _, record in ranking_records(db, labellers=names, report=report))
    elif kind == "trl":
        rows = trl_records(db, labellers=names)
    else:
        rows = sft_records(db, labellers=names)
    try:
        sink = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")
    except OSError as error:
        raise AlignlabError(f"cannot write: {error.strerror}", file=output) from error
    count = 0
    try:
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    finally:
        if sink is not sys.stdout:
            sink.close()
    if kind == "ranking":
        print(report.summary(db_path), file=sys.stderr)
    print(f"alignlab studio: wrote {count} {kind} records to {output if output != '-' else 'standard output'}",
          file=sys.stderr)
    return count


def serve(args: argparse.Namespace, prompts: list[Any]) -> None:
    """Bind, print the URL, serve until interrupted."""
    import uvicorn

    from alignlab.data.studio_db import StudioDB
    from alignlab.studio.app import StudioSettings, allowed_hosts_for, create_app, is_local, runs_dir_for, studio_url
    from alignlab.studio.jobs import JobRunner
    from alignlab.studio.sampler import Sampler, SamplerSettings

    db = StudioDB(args.db)
    token = None if is_local(args.host) else (args.token or secrets.token_urlsafe(16))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        raise AlignlabError(f"cannot listen on {args.host}:{args.port}: {error.strerror}", field="--port") from error
    sock.listen(128)
    port = sock.getsockname()[1]
    sampler = Sampler(db, args.model, prompts, SamplerSettings(
        k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, ahead=args.ahead, ab_size=args.ab_size), args.labeller)
    jobs = JobRunner(runs_dir_for(Path(args.db)))
    settings = StudioSettings(labeller=args.labeller, token=token, allowed_hosts=allowed_hosts_for(args.host),
                              max_body=args.max_body, model=args.model, train_steps=args.train_steps,
                              train_lr=args.train_lr, train_batch_size=args.train_batch_size)
    app = create_app(db, sampler, jobs, settings)
    url = studio_url(args.host, port, token)
    sampler.start()
    print(f"alignlab studio: {len(prompts)} prompts, model {args.model}, store {args.db}", flush=True)
    print(f"alignlab studio: open {url}", flush=True)
    if token:
        print("alignlab studio: this address is reachable from other machines; the URL above carries the token "
              "it needs", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sampler.stop()
        jobs.stop_all()
        sock.close()
