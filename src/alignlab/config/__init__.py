"""Configuration: one dataclass per stage (every trainer, best-of-n, rejection sampling, the lab), read from
YAML with ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]``; the CLI builds its options from these
dataclasses, so ``--help`` documents every option and a YAML file can set any of them.

Submodules: ``options`` the option machinery, ``trainers`` each stage's config, ``lab`` the lab's and the study's.
"""

from __future__ import annotations

from alignlab.config.lab import (
    ALL_METHODS,
    CHECKPOINTING_METHODS,
    GROUP_METHODS,
    MODELS_IN_MEMORY,
    PAIRWISE_METHODS,
    STUDY_OWN_FIELDS,
    STUDY_SWEEPS,
    VERIFIABLE_METHODS,
    LabConfig,
    StudyConfig,
    Sweep,
    check_study_lists,
    copy_value,
    quick_config,
    quick_study_config,
)
from alignlab.config.options import (
    Checked,
    build_config,
    check_value,
    config_fields,
    config_to_dict,
    describe_range,
    opt,
    parse_columns,
    validate_config,
)
from alignlab.config.trainers import (
    DPO_LOSSES,
    BoNConfig,
    DataConfig,
    DPOConfig,
    GRPOConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    RewardScoreConfig,
    RSConfig,
    SampleConfig,
    SFTConfig,
    TrainConfig,
)

__all__ = [
    "ALL_METHODS",
    "BoNConfig",
    "CHECKPOINTING_METHODS",
    "Checked",
    "DPOConfig",
    "DPO_LOSSES",
    "DataConfig",
    "GROUP_METHODS",
    "GRPOConfig",
    "LabConfig",
    "MODELS_IN_MEMORY",
    "ModelConfig",
    "PAIRWISE_METHODS",
    "PPOConfig",
    "RSConfig",
    "RewardConfig",
    "RewardScoreConfig",
    "SFTConfig",
    "STUDY_OWN_FIELDS",
    "STUDY_SWEEPS",
    "SampleConfig",
    "StudyConfig",
    "Sweep",
    "TrainConfig",
    "VERIFIABLE_METHODS",
    "build_config",
    "check_study_lists",
    "check_value",
    "config_fields",
    "config_to_dict",
    "copy_value",
    "describe_range",
    "opt",
    "parse_columns",
    "quick_config",
    "quick_study_config",
    "validate_config",
]
