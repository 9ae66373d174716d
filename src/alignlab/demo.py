"""``alignlab demo``: the lab on its built-in default, the controlled-sentiment task with SmolLM2.

``make demo`` runs this: SFT -> simulated preference data -> reward model -> PPO (with and without the KL
penalty), DPO, IPO, SimPO, rejection sampling and best-of-n -> evaluation -> ``runs/demo/report.md`` and
``report.html``. ``--quick`` runs the same pipeline on the tiny random model with small budgets (the test
suite runs it); every lab option can be overridden (``alignlab demo --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from alignlab.lab.pipeline import LabConfig, quick_config, run_lab


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from alignlab.cli import add_config_options

    parser.add_argument("--quick", action="store_true",
                        help="tiny-random model and small budgets: the whole pipeline in about a minute")
    add_config_options(parser, LabConfig)


def run_demo(args: argparse.Namespace) -> Path:
    from alignlab.cli import config_from_args

    cfg = config_from_args(LabConfig, args)
    if args.quick:  # quick defaults, then whatever the user set explicitly
        explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LabConfig)
                    if getattr(cfg, f.name) != getattr(LabConfig(), f.name)}
        cfg = quick_config(**explicit)
    return run_lab(cfg)
