"""Experiment configuration: typed sections, built-in presets (``quick``, ``full``) and overrides.

The training runs of an experiment are ordinary :class:`preftune.config.TrainConfig` objects built from
``train`` (shared settings) plus one ``methods`` entry per method and beta, so every key is checked by
the same code as ``preftune train``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import (
    ONLINE_METHODS,
    ConfigError,
    GenerationConfig,
    LoraConfig,
    TrainConfig,
    apply_overrides,
    build_dataclass,
    read_yaml,
    train_config_from_dict,
)

PRESETS = ("quick", "sweep", "full")


@dataclass
class PromptsConfig:
    train_file: str | None = None  # one prompt per line; None = the built-in movie-review openings
    heldout_file: str | None = None
    n_train: int | None = None  # use the first n (None = all)
    n_heldout: int | None = None


@dataclass
class SampleConfig(GenerationConfig):
    k: int = 4  # responses per training prompt


@dataclass
class PairsConfig:
    mode: str = "all"  # all | best_vs_worst


@dataclass
class ExpTrainConfig:
    """Settings shared by every training run (the ``training`` section of ``preftune train``)."""

    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp32 master weights either way)
    max_length: int = 128
    max_prompt_length: int = 64
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class MethodRun:
    method: str = "dpo"
    betas: list[float] = field(default_factory=lambda: [0.1])  # GRPO: its KL coefficient
    options: dict = field(default_factory=dict)  # other keys of the method's section (alpha, gamma, ...)
    training: dict = field(default_factory=dict)  # overrides of the shared `train` settings for this method
    generation: dict = field(default_factory=dict)  # online methods: overrides of the `sample` settings


@dataclass
class EvalConfig(GenerationConfig):
    samples_per_prompt: int = 2
    logp_batch_size: int = 32
    pairs_mode: str = "best_vs_worst"  # held-out preference pairs for the avg-logp agreement diagnostic


@dataclass
class ExperimentConfig:
    name: str = "sentiment"
    output_dir: str = "experiments/sentiment"
    seed: int = 0
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    reward: str = "vader"  # vader | module:function | reward_model:PATH
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: ExpTrainConfig = field(default_factory=ExpTrainConfig)
    methods: list[MethodRun] = field(default_factory=lambda: [MethodRun()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    progress: bool = True


def _preset_path(name: str) -> Path:
    return Path(str(resources.files("preftune.experiments") / "presets" / f"{name}.yaml"))


def load_experiment_config(spec: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """``spec`` is a preset name (quick, full) or a YAML path."""
    path = _preset_path(spec) if spec in PRESETS and not Path(spec).exists() else Path(spec)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return experiment_config_from_dict(raw, source=str(spec))


def experiment_config_from_dict(raw: dict, source: str = "experiment config") -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    methods = raw.get("methods")
    if isinstance(methods, list):
        raw["methods"] = [_split_method(m, i, source) for i, m in enumerate(methods)]
    try:
        cfg = build_dataclass(ExperimentConfig, raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not cfg.methods:
        raise ConfigError(f"{source}: methods must list at least one method")
    if cfg.pairs.mode not in ("all", "best_vs_worst") or cfg.eval.pairs_mode not in ("all", "best_vs_worst"):
        raise ConfigError(f"{source}: pairs.mode / eval.pairs_mode must be all or best_vs_worst")
    if cfg.eval.temperature != 1.0 or cfg.eval.top_p != 1.0:
        raise ConfigError(
            f"{source}: eval.temperature and eval.top_p must be 1.0: the KL estimate needs samples from the "
            "model's own distribution"
        )
    if cfg.sample.k < 2:
        raise ConfigError(f"{source}: sample.k must be >= 2 to build pairs, got {cfg.sample.k}")
    for i, run in enumerate(cfg.methods):
        if run.method == "reward_model":
            raise ConfigError(
                f"{source}: methods[{i}]: reward_model trains a scorer, not a policy, so it cannot be sampled "
                "and evaluated here; train it with `preftune train` and use it as `reward: reward_model:PATH`"
            )
    names: set[str] = set()
    for run in cfg.methods:  # build every training config now: bad keys fail before any sampling
        for beta in run.betas:
            train_config(cfg, run, beta, output_dir="unused")
            name = run_name(run, beta)
            if name in names:
                raise ConfigError(f"{source}: two runs are both named {name!r}; give them different options")
            names.add(name)
    return cfg


def run_name(run: MethodRun, beta: float) -> str:
    extra = "".join(f"-{k}{v}" for k, v in sorted(run.options.items()) if k != "rewards")
    return f"{run.method}{extra}-beta{beta:g}"


def _split_method(entry: Any, i: int, source: str) -> dict:
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"{source}: methods[{i}] must be a mapping with a 'method' key")
    entry = dict(entry)
    out = {"method": entry.pop("method")}
    if "betas" in entry:
        out["betas"] = entry.pop("betas")
    if "beta" in entry:
        raise ConfigError(f"{source}: methods[{i}]: use 'betas: [...]' (a list), not 'beta'")
    for section in ("training", "generation"):
        if section in entry:
            out[section] = entry.pop(section)
    out["options"] = entry
    return out


def train_dtype(cfg: ExperimentConfig) -> str:
    """The weights' dtype in training: `dtype` is the experiment's inference dtype, trained weights stay fp32
    (the frozen base under LoRA is stored in `dtype`)."""
    return cfg.dtype if cfg.train.lora.enabled else "float32"


def train_config(cfg: ExperimentConfig, run: MethodRun, beta: float, *, output_dir: str) -> TrainConfig:
    """The ``preftune train`` config of one (method, beta) run on the experiment's pairs."""
    t = cfg.train
    online = run.method in ONLINE_METHODS
    raw = {
        "method": run.method,
        "model": {"name_or_path": cfg.model, "dtype": train_dtype(cfg), "lora": vars(t.lora).copy()},
        "data": {
            "train": "prompts.txt" if online else "pairs.jsonl",
            "max_length": t.max_length,
            "max_prompt_length": t.max_prompt_length,
        },
        "training": {
            "output_dir": output_dir,
            "seed": cfg.seed,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "epochs": t.epochs,
            "max_steps": t.max_steps,
            "learning_rate": t.learning_rate,
            "lr_scheduler": t.lr_scheduler,
            "warmup_steps": t.warmup_steps,
            "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm,
            "mixed_precision": t.mixed_precision,
        },
        run.method: {"beta": beta, **run.options},
    }
    raw["training"].update(run.training)
    if online:  # trained on the training prompts, with the experiment's reward and sampling settings
        raw[run.method].setdefault("rewards", [cfg.reward])
        s = cfg.sample
        sampling = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
        raw["generation"] = {**sampling, "batch_size": s.batch_size, **run.generation}
    elif run.generation:
        raise ConfigError(f"methods entry {run.method}: `generation` is for online methods only")
    tcfg = train_config_from_dict(raw, source=f"methods entry {run.method} beta={beta}")
    tcfg.training.progress = cfg.progress  # not part of the raw dict: it must not change stage fingerprints
    return tcfg
