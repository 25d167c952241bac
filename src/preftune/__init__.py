"""preftune: preference alignment for causal language models.

Notebook API::

    import preftune
    cfg = preftune.load_config("configs/dpo.yaml", ["dpo.beta=0.2"])   # also a dict or a TrainConfig
    run_dir = preftune.train(cfg)                                      # also a dict or a YAML path
"""

from .config import TrainConfig, load_config, train_config_from_dict

__version__ = "0.1.0"


def train(config, **kwargs):
    """Train from a :class:`TrainConfig`, a dict or a YAML path; returns the run directory."""
    from .training import train as _train

    return _train(config, **kwargs)


def validate(config, **kwargs) -> dict:
    """What :func:`train` would do with ``config`` (a TrainConfig, a dict or a YAML path), checked."""
    from .training import validate as _validate

    return _validate(config, **kwargs)


__all__ = ["TrainConfig", "load_config", "train", "train_config_from_dict", "validate", "__version__"]
