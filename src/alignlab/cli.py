"""The ``alignlab`` command line: arguments -> a config dataclass -> one call into a stage.

Every stage's options come from its config dataclass (``alignlab.config``), so ``--help`` lists them all with
their defaults. Options can also come from ``--config FILE.yaml`` and from ``key=value`` words, e.g.
``alignlab sft --model tiny-random --data d.json max_steps=10 lr=1e-4``. Later sources win:
defaults < YAML < ``--option`` < ``key=value``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignlab.config import build_config, config_fields
from alignlab.errors import AlignlabError

# Stage registry: name -> (help, config class path, function path). Imported lazily so `--help` is fast.
Stage = tuple[str, str, str]
# A name with a space ("rm train") becomes a nested subcommand. Each trainer adds its own line below.
STAGES: dict[str, Stage] = {
    "sft": ("supervised fine-tuning on instruction data", "alignlab.config:SFTConfig",
            "alignlab.train.sft:train_sft"),
    # stages: reward model
    "rm train": ("train a reward model on preference pairs or rankings (Bradley-Terry / K-wise)",
                 "alignlab.config:RewardConfig", "alignlab.train.reward_model:train_reward"),
    "rm score": ("score a data file with a reward model or a Python function; writes a scored copy",
                 "alignlab.config:RewardScoreConfig", "alignlab.scoring:score_data"),
    # stages: dpo
    "dpo": ("preference optimisation: dpo, cdpo, robust, ipo, hinge, simpo, orpo (pairs) or kto (feedback)",
            "alignlab.config:DPOConfig", "alignlab.train.dpo:train_dpo"),
    # stages: ppo
    "ppo": ("RLHF with PPO: sample, score with a reward model or a Python function, update at a controlled KL",
            "alignlab.config:PPOConfig", "alignlab.train.ppo:train_ppo"),
    # stages: grpo
    "grpo": ("critic-free RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ with group baselines, verifiable or learned rewards",
             "alignlab.config:GRPOConfig", "alignlab.train.grpo:train_grpo"),
    # stages: rejection sampling / best-of-n
    "bon": ("best-of-n: sample n answers per prompt, keep the best by reward, with the KL and reward curve",
            "alignlab.config:BoNConfig", "alignlab.train.rejection:run_bon"),
    "rs": ("rejection-sampling fine-tuning: sample, keep the best, fine-tune, repeat",
           "alignlab.config:RSConfig", "alignlab.train.rejection:run_rs"),
    # stages: lab
    "lab run": ("run the lab: the whole pipeline on one task, every method compared, report.md/html",
                "alignlab.config:LabConfig", "alignlab.lab.pipeline:run_lab"),
}


def _import(path: str) -> Any:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field, with its help, default and choices."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (overridden by the command line)")
    for name, typ, default, help_text, choices in config_fields(cls):
        flag = "--" + name.replace("_", "-")
        kind = getattr(typ, "__name__", str(typ))
        if typ is bool or kind == "bool":  # `--lora` alone means true; `--lora false` also works
            parser.add_argument(flag, dest=name, default=None, metavar="BOOL", nargs="?", const="true",
                                help=f"{help_text} (default: {default!r})")
            continue
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.upper(), choices=choices,
            help=f"{help_text} (default: {default!r})",
        )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more options as key=value")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Defaults < YAML < --options < key=value words."""
    overrides: dict[str, Any] = {}
    words = list(getattr(args, "overrides", []) or [])
    for name, typ, *_ in config_fields(cls):
        value = getattr(args, name, None)
        if typ is bool and isinstance(value, str) and "=" in value:  # `--lora max_steps=3`: a bare flag, then a word
            words.insert(0, value)
            value = "true"
        if value is not None:
            overrides[name] = value
    yaml_file = getattr(args, "config", None)
    for word in words:
        if "=" not in word and word.endswith((".yaml", ".yml")) and yaml_file is None:
            yaml_file = word  # `alignlab lab run CONFIG.yaml`
            continue
        if "=" not in word:
            raise AlignlabError(f"expected KEY=VALUE (or a .yaml config file), got '{word}'")
        key, value = word.split("=", 1)
        overrides[key.strip().replace("-", "_")] = value
    return build_config(cls, yaml_file=yaml_file, overrides=overrides)


def _stage_command(cls_path: str, fn_path: str) -> Callable[[argparse.Namespace], Any]:
    def run(args: argparse.Namespace) -> Any:
        cfg = config_from_args(_import(cls_path), args)
        if getattr(cfg, "offline", False):  # before anything is loaded
            from alignlab.models import set_offline

            set_offline(True)
        return _import(fn_path)(cfg)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignlab",
        description="Teach a language model what its users prefer: SFT, reward models, PPO, rejection "
        "sampling, DPO and its family, and a lab that compares them.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network: hub ids load from the local cache only (as offline=true "
                        "or HF_HUB_OFFLINE=1; built-in models work offline)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    groups: dict[str, Any] = {}
    for name, (help_text, cls_path, fn_path) in STAGES.items():
        parent = sub
        if " " in name:
            group, name = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND", required=True)
            parent = groups[group]
        # each option's help already states its real default (the parser's own default is None, so that
        # only options given on the command line override the YAML file)
        p = parent.add_parser(name, help=help_text, description=help_text)
        add_config_options(p, _import(cls_path))
        p.set_defaults(func=_stage_command(cls_path, fn_path))

    from alignlab.config import StudyConfig

    study = groups["lab"].add_parser(
        "study", help="the answer across KL controls and seeds: every method's reward/KL frontier, compared at KL "
        "budgets (study.md/json/html, frontiers.png)",
        description="Run one lab per seed (OUTPUT_ROOT/NAME/seed-S) and in each train every method at each value of "
        "its KL control (ppo: ppo_kl_coefs; dpo, ipo: betas; grpo, rloo: grpo_betas; rs: rs_ns; bon: its curve "
        "over n), evaluated along training; then compare the methods' frontiers at the KL budgets across seeds. "
        "Every lab option applies to each seed's lab, with the lab's defaults (the demo's). Every stage is cached: "
        "a rerun resumes where a failure stopped it.")
    study.add_argument("--quick", action="store_true",
                       help="tiny-random model, the quick lab budgets, 2 seeds, 2 values for ppo and dpo, best-of-n: "
                       "the whole study in well under a minute")
    add_config_options(study, StudyConfig)
    study.set_defaults(func=cmd_lab_study)

    g = sub.add_parser("generate", help="sample from a model for prompts, or chat interactively",
                       description="Sample from any model. Prompts come from --prompt (repeatable), "
                       "--prompts FILE (one per line, or any instruction/preference file), or an "
                       "interactive chat when neither is given.")
    g.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint folder, hub id or built-in name")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--prompts", metavar="FILE", help="file of prompts: .txt (one per line) or a data file")
    g.add_argument("--template", default="chat", choices=["chat", "alpaca", "none"],
                   help="how a prompt is rendered before generation")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt; range: >= 1")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy); range: >= 0")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold; range: 0 < x <= 1")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together; range: >= 1")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--output", metavar="FILE", help="also write prompts and responses as JSONL")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weights (unsafe)")
    g.set_defaults(func=cmd_generate)

    from alignlab.bench import add_bench_arguments, cmd_bench  # stdlib-only at import time

    b = sub.add_parser("bench", help="benchmark a stage against TRL: tokens/s, s/step, peak memory, loss, MFU",
                       description="Train the same model on the same data with alignlab and with TRL, each in "
                       "its own process, and compare them (see alignlab/bench/measure.py for what is measured).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job: the lab on the built-in sentiment task with SmolLM2 (SFT, "
                          "reward model, PPO, DPO, IPO, SimPO, rejection sampling, best-of-n) and its report",
                          description="Run the lab (alignlab lab run) with the built-in defaults; every option "
                          "below overrides one. The report goes to OUTPUT_ROOT/NAME/report.md and report.html.")
    from alignlab.config import LabConfig

    demo.add_argument("--quick", action="store_true",
                      help="tiny-random model and small budgets: the whole pipeline in about a minute")
    add_config_options(demo, LabConfig)
    demo.set_defaults(func=cmd_demo)

    d = sub.add_parser("data", help="look at data before training on it")
    dsub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    di = dsub.add_parser("inspect", help="show how a data file renders, which tokens carry loss, and what "
                         "was truncated or dropped and why",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    di.add_argument("file", help="data file (.json/.jsonl/.csv/.parquet, gz ok) or hub dataset id")
    di.add_argument("--kind", default="auto", choices=["auto", "sft", "preference"],
                    help="instruction (sft) or preference data; auto decides from the records")
    di.add_argument("--format", default="auto", help="record format (see alignlab sft --help)")
    di.add_argument("--template", default="auto", choices=["auto", "alpaca", "chat", "none"],
                    help="prompt template")
    di.add_argument("--columns", default="", help="rename columns, e.g. instruction=Q,output=A")
    di.add_argument("--model", default="tiny-random", help="model whose tokenizer counts the tokens")
    di.add_argument("--max-length", type=int, default=512, help="maximum tokens per example; range: >= 1")
    di.add_argument("--truncation", default="right", choices=["right", "drop"], help="over-length policy")
    di.add_argument("--strict", action="store_true",
                    help="stop at the first invalid record (default: count and report invalid records)")
    di.add_argument("-n", type=int, default=3, help="examples to show; range: >= 0")
    di.set_defaults(func=cmd_data_inspect)

    st = sub.add_parser("studio", help="a local web page where people rank the model's answers, train on them "
                        "(DPO, or a reward model + PPO) and check the result in a blind A/B round",
                        description="Start the preference studio: a web server (127.0.0.1 by default) that samples "
                        "answers from --model for --prompts, stores every judgement in --db (SQLite; trainers read "
                        "it with --data), trains in the background and runs blind A/B rounds. Prints the URL.")
    from alignlab.studio.server import add_studio_arguments

    add_studio_arguments(st)
    st.set_defaults(func=lambda a: _import("alignlab.studio.server:run_studio")(a))
    return parser


# ----------------------------------------------------------------------------------------------- commands


def read_prompt_file(path: str) -> list[Any]:
    """Prompts from a ``.txt`` file (one per non-empty line) or any instruction/preference data file."""

    p = Path(path)
    if p.suffix == ".txt":
        if not p.exists():
            raise AlignlabError("prompt file does not exist", file=path)
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from alignlab.tasks.loading import load_prompts

        prompts = load_prompts(path)
    if not prompts:
        raise AlignlabError("no prompts in this file", file=path)
    return prompts


def cmd_demo(args: argparse.Namespace) -> Path:
    """``alignlab demo``: the lab on its built-in default, the controlled-sentiment task with SmolLM2.

    ``make demo`` runs this: SFT -> simulated preference data -> reward model -> PPO (with and without the KL
    penalty), DPO, IPO, SimPO, rejection sampling and best-of-n -> evaluation -> ``runs/demo/report.md`` and
    ``report.html``. ``--quick`` runs the same pipeline on the tiny random model with small budgets (the test
    suite runs it); every lab option can be overridden (``alignlab demo --help``).
    """
    import dataclasses

    from alignlab.config import LabConfig, quick_config
    from alignlab.lab.pipeline import run_lab

    cfg = config_from_args(LabConfig, args)
    if args.quick:  # quick defaults, then whatever the user set explicitly
        explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LabConfig)
                    if getattr(cfg, f.name) != getattr(LabConfig(), f.name)}
        cfg = quick_config(**explicit)
    return run_lab(cfg)


def cmd_lab_study(args: argparse.Namespace) -> Path:
    """``alignlab lab study``: every method's frontier across its KL control and seeds (``alignlab.lab.study``);
    ``--quick`` starts from :func:`alignlab.config.quick_study_config`, then whatever the user set explicitly."""
    import dataclasses

    from alignlab.config import StudyConfig, quick_study_config
    from alignlab.lab.study import run_study

    cfg = config_from_args(StudyConfig, args)
    if args.quick:
        explicit = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudyConfig)
                    if getattr(cfg, f.name) != getattr(StudyConfig(), f.name)}
        cfg = quick_study_config(**explicit)
    return run_study(cfg)


def check_ranges(args: argparse.Namespace, ranges: dict[str, dict[str, float]]) -> None:
    """The range checks of the config options (:func:`alignlab.config.check_value`) for a plain argparse command."""
    from alignlab.config import check_value

    for name, bounds in ranges.items():
        value = getattr(args, name)
        check_value(name, value, type(value), {"range": bounds})


def cmd_generate(args: argparse.Namespace) -> None:
    import json

    check_ranges(args, {"max_new_tokens": {"ge": 1}, "temperature": {"ge": 0}, "top_p": {"gt": 0, "le": 1},
                        "batch_size": {"ge": 1}})

    from alignlab.generation import SamplingConfig, generate
    from alignlab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, allow_pickle=args.allow_pickle)
    model.eval()
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    prompts: list[Any] = list(args.prompt)
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    if not prompts:  # interactive chat
        history: list[dict[str, str]] = []
        print("chat with", args.model, "(empty line or Ctrl-D to quit)")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            out = generate(model, tokenizer, [list(history)], sampling, template="chat")[0]
            print("model>", out.text)
            history.append({"role": "assistant", "content": out.text})
        return
    outs = generate(model, tokenizer, prompts, sampling, template=args.template)
    sink = open(args.output, "w") if args.output else None
    for prompt, out in zip(prompts, outs):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f"### prompt\n{shown}\n### response\n{out.text}\n")
        if sink:
            sink.write(json.dumps({"prompt": prompt, "response": out.text, "finished": out.finished}) + "\n")
    if sink:
        sink.close()


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from alignlab.config import parse_columns

    check_ranges(args, {"max_length": {"ge": 1}, "n": {"ge": 0}})
    from alignlab.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    kind = args.kind
    if kind == "auto":
        from alignlab.data.io import read_records
        from alignlab.data.preference import detect_format

        first = next(iter(read_records(args.file)), None)
        kind = "preference" if first is not None and detect_format(first[1], parse_columns(args.columns)) \
            else "sft"
    if kind == "preference":
        from alignlab.data.preference import inspect_preference_file

        print(inspect_preference_file(args.file, tokenizer, format=args.format, template=args.template,
                                      n=args.n, columns=parse_columns(args.columns),
                                      skip_invalid=not args.strict))
    else:
        from alignlab.data.inspect import inspect_sft_file

        print(inspect_sft_file(args.file, tokenizer, format=args.format, template=args.template,
                               columns=parse_columns(args.columns), max_length=args.max_length,
                               truncation=args.truncation, skip_invalid=not args.strict, n=args.n))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, taking ``key=value`` words wherever they stand: argparse collects the positional words only
    up to the first ``--option``, so words after it come back unparsed and join the overrides here."""
    args, extra = parser.parse_known_args(argv)
    words = [w for w in extra if "=" in w and not w.startswith("-")]
    unknown = [w for w in extra if w not in words]
    if unknown or (words and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or words)}")
    if words:
        args.overrides = list(args.overrides or []) + words
    return args


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (in-process callers such as the tests call :func:`main` many times)."""
    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``alignlab`` command."""
    parser = _parser()
    args = parse_args(parser, argv)
    if args.offline:
        from alignlab.models import set_offline

        set_offline(True)
    try:
        args.func(args)
    except AlignlabError as e:
        if args.debug:
            raise
        print(f"alignlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignlab: interrupted", file=sys.stderr)
        return 130
    finally:
        from alignlab.train.run_folder import release_all

        release_all()  # a run stopped by an error releases its folder at once
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroy the distributed process group, if a launcher made one, before the interpreter exits: left to the
    exit-time destructors, gloo's worker threads can abort the process ("terminate called without an active
    exception", seen once in the two-process reward-model test) after the run has finished."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
