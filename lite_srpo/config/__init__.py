"""The recipe: typed dataclasses, YAML loading with `key.sub=value` overrides, and validation.

Import the recipe from here (`from lite_srpo.config import RunConfig, load_config`).
"""
from .load import (apply_overrides, config_from_dict, config_to_dict, dump_yaml, load_config, load_recipe_dict,
                   parse_override)
from .schema import (ALGORITHM_PRESETS, ALGORITHMS, CHOICES, UNION_HINTS, AlgorithmConfig, CorruptionConfig, DataConfig,
                     LoraConfig, ModelConfig, OptimConfig, PapoConfig, RewardConfig, RolloutConfig, RunConfig,
                     SftConfig, SrpoConfig, TrainConfig, VgpoConfig, VppoConfig)
from .validate import check_divisible, problems

__all__ = [
    "ALGORITHMS",
    "ALGORITHM_PRESETS",
    "AlgorithmConfig",
    "CHOICES",
    "CorruptionConfig",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PapoConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SftConfig",
    "SrpoConfig",
    "TrainConfig",
    "UNION_HINTS",
    "VgpoConfig",
    "VppoConfig",
    "apply_overrides",
    "check_divisible",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "load_recipe_dict",
    "parse_override",
    "problems",
]
