"""Typed configuration tree: YAML files plus ``--set a.b=c`` overrides.

Every component receives only its own sub-config (``cfg.data``, ``cfg.train``, ...). Loading is
strict: an unknown key, a wrong type or an invalid choice raises :class:`ConfigError` with one
line naming the key, the file and what was expected. Field docs live in ``metadata["help"]`` and
``docs/configuration.md`` is generated from them (``python -m vlp.config.docs``; a test keeps the
two in sync).

- :mod:`vlp.config.tree`: the dataclasses (sections, fields, defaults, help);
- :mod:`vlp.config.load`: YAML files, ``--set`` overrides and saved dicts -> a checked tree;
- :mod:`vlp.config.checks`: the value checks types cannot express.
"""

from vlp.config.load import config_from_dict, load_config, save_config
from vlp.config.tree import (
    Config,
    ConfigError,
    ContrastiveConfig,
    DataConfig,
    DeepSpeedConfig,
    DistillConfig,
    EvalConfig,
    HardNegativesLossConfig,
    LossConfig,
    ModelConfig,
    NegativesDataConfig,
    PreprocessConfig,
    TextTowerConfig,
    TrainConfig,
    VisionTowerConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "ContrastiveConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "DistillConfig",
    "EvalConfig",
    "HardNegativesLossConfig",
    "LossConfig",
    "ModelConfig",
    "NegativesDataConfig",
    "PreprocessConfig",
    "TextTowerConfig",
    "TrainConfig",
    "VisionTowerConfig",
    "config_from_dict",
    "load_config",
    "save_config",
]
