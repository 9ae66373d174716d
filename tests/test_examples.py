"""The cluster launch configs in ``examples/accelerate/``: each loads with accelerate's own config loader, names
only options ``accelerate launch`` knows, and turns into the environment ``accelerate launch`` would hand the
processes (DDP, FSDP full shard wrapping Llama decoder layers, DeepSpeed ZeRO-2 and ZeRO-3). Running them needs
GPUs; here only their content is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from accelerate.utils.dataclasses import get_module_class_from_name

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
CONFIGS = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}


def launch_env(name: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file NAME.yaml`` gives each process."""
    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / f"{name}.yaml"), "-m", "alignlab.cli"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_loads_and_names_only_known_options(name):
    cfg = load_config_from_file(str(EXAMPLES / f"{name}.yaml"))  # unknown top-level keys raise here
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == CONFIGS[name] and not cfg.use_cpu
    assert cfg.num_processes > 1 and cfg.num_machines == 1
    known = {action.dest for action in launch_command_parser()._actions}
    for section in (cfg.fsdp_config, cfg.deepspeed_config):
        unknown = [k for k in section or {} if k not in known]
        assert not unknown, f"{name}.yaml: accelerate launch has no option {unknown}"


def test_fsdp_full_shard_wraps_llama_decoder_layers():
    env = launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_USE_ORIG_PARAMS"] == "true"  # LoRA and the optimizer's parameter groups need it
    # the class to wrap is the decoder layer of the built-in models (both are Llama models)
    from alignlab.models import load_model

    layer = get_module_class_from_name(load_model("tiny-random"), env["FSDP_TRANSFORMER_CLS_TO_WRAP"])
    assert layer is not None and layer.__name__ == "LlamaDecoderLayer"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", "2"), ("deepspeed_zero3", "3")])
def test_deepspeed_zero_stages(name, stage):
    env = launch_env(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    # alignlab accumulates micro-batches itself and DeepSpeed steps inside every backward: it must not accumulate
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
    assert float(env["ACCELERATE_GRADIENT_CLIPPING"]) == 1.0  # alignlab's default max_grad_norm
    if stage == "3":
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"


def test_ddp_runs_on_every_gpu():
    env = launch_env("ddp")
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    cfg = load_config_from_file(str(EXAMPLES / "ddp.yaml"))
    assert cfg.gpu_ids == "all"


def test_sharding_engines_refuse_what_they_cannot_do(tmp_path):
    """DeepSpeed steps inside every backward (so no accumulation), and a sharded run cannot resume from a
    checkpoint holding full weights and one process's optimizer state: both are clear errors up front."""
    from types import SimpleNamespace

    from alignlab.config import SFTConfig, build_config
    from alignlab.errors import AlignlabError
    from alignlab.train.loop import Run

    def fake(kind: str) -> SimpleNamespace:
        return SimpleNamespace(distributed_type=f"DistributedType.{kind}", is_main_process=True, process_index=0,
                               num_processes=2, device="cpu")

    cfg = build_config(SFTConfig, overrides={"output_dir": str(tmp_path / "a"), "grad_accum": 2})
    with pytest.raises(AlignlabError, match="DeepSpeed keep grad_accum=1"):
        Run(cfg, "sft", accelerator=fake("DEEPSPEED"))
    run = Run(build_config(SFTConfig, overrides={"output_dir": str(tmp_path / "b")}), "sft",
              accelerator=fake("FSDP"))
    assert run.shards_weights and run.resume(None, None, None) == (0, {})  # nothing to resume: fine
    (tmp_path / "b" / "checkpoints" / "step-1").mkdir()
    with pytest.raises(AlignlabError, match="resuming under FSDP is not supported"):
        run.resume(None, None, None)
    assert not Run(build_config(SFTConfig, overrides={"output_dir": str(tmp_path / "c")}), "sft",
                   accelerator=fake("MULTI_CPU")).shards_weights
