"""preftune: preference alignment for causal language models.

Notebook API::

    import preftune
    cfg = preftune.load_config("configs/dpo.yaml", ["dpo.beta=0.2"])
    run_dir = preftune.train(cfg)
"""

from .config import TrainConfig, train_config_from_dict
from .config import load_train_config as load_config

__version__ = "0.1.0"


def train(config, **kwargs):
    """Train from a :class:`TrainConfig`, a dict or a YAML path; returns the run directory."""
    from .training import train as _train

    return _train(_as_config(config), **kwargs)


def validate(config, **kwargs) -> dict:
    from .training import validate as _validate

    return _validate(_as_config(config), **kwargs)


def _as_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return train_config_from_dict(config)
    return load_config(config)


__all__ = ["TrainConfig", "load_config", "train", "train_config_from_dict", "validate", "__version__"]
