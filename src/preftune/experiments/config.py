"""Experiment configuration: typed sections, built-in presets (``quick``, ``sweep``, ``paper``, ``full``,
``tune``) and overrides.

The training runs of an experiment are ordinary :class:`preftune.config.TrainConfig` objects built from
``train`` (shared settings) plus one ``methods`` entry per method and beta, so every key is checked by
the same code as ``preftune train``. :func:`plan_runs` lists every (method, beta, pairs setting, seed) run
with its stage names; the pipeline, the validation here and the tests all read that one list. With a
``tune`` section that list holds every candidate setting (learning rate, SimPO's γ/β) of every run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import (
    ConfigError,
    DataConfig,
    GenerationConfig,
    LoraConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    build_dataclass,
    method_kind,
    read_yaml,
    train_config_from_dict,
)
from .pairs import MODES as PAIR_MODES

PRESETS = ("quick", "sweep", "paper", "full", "tune")


@dataclass
class PromptsConfig:
    train_file: str | None = None  # one prompt per line; None = the built-in movie-review openings
    heldout_file: str | None = None
    n_train: int | None = None  # use the first n (None = all)
    n_heldout: int | None = None
    # a seeded share of the (first n_train) training prompts set aside for validation, never trained on
    validation_fraction: float = 0.0


@dataclass
class SampleConfig(GenerationConfig):
    k: int = 4  # responses per training prompt


@dataclass(frozen=True)
class PairsConfig:
    mode: str = "all"  # all | best_vs_worst
    max_pairs: int | None = None  # keep the first N pairs after a shuffle seeded by `seed` (None = all)


@dataclass
class MethodRun:
    method: str = "dpo"
    betas: list[float] = field(default_factory=lambda: [0.1])  # GRPO: its KL coefficient
    options: dict = field(default_factory=dict)  # other keys of the method's section (alpha, gamma, ...)
    training: dict = field(default_factory=dict)  # overrides of the shared `train` settings for this method
    generation: dict = field(default_factory=dict)  # online methods: overrides of the `sample` settings
    pairs: dict = field(
        default_factory=dict
    )  # offline methods: overrides of the experiment's `pairs` section
    reward: str | None = None  # online methods: `learned` = a reward model trained on the experiment's pairs
    tune: dict = field(default_factory=dict)  # overrides of the experiment's `tune` section for this entry
    # kto only: `samples` = unpaired records from the experiment's samples (above / below the prompt's median
    # reward), `pairs` = each pair of the entry's pairs gives one desirable and one undesirable record
    kto_data: str | None = None


@dataclass
class EvalConfig(GenerationConfig):
    samples_per_prompt: int = 2
    logp_batch_size: int = 32
    pairs_mode: str = "best_vs_worst"  # held-out preference pairs for the avg-logp agreement diagnostic


@dataclass
class TuneConfig:
    """``tune:``: every run is trained once per candidate setting, each candidate is evaluated on the
    validation prompts, and only the chosen one per run (:func:`preftune.experiments.tuning.choose`) is
    evaluated on the held-out prompts. A methods entry's ``tune: {...}`` overrides these keys for it."""

    learning_rates: list[float] | None = None  # None = the entry's own learning rate only
    simpo_gamma_beta_ratios: list[float] | None = None  # SimPO: γ = ratio·β (replaces the entry's γ)
    max_kl: float = 2.0  # nats: the bound on the validation KL within which the highest reward is chosen


@dataclass
class ExperimentConfig:
    name: str = "sentiment"
    output_dir: str = "experiments/sentiment"
    seed: int = 0  # the data's seed (training samples, pairs subsets) and the run seed when `seeds` is absent
    seeds: list[int] | None = None  # each training run and its evaluation repeated per seed; None = [seed]
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    reward: str = "vader"  # vader | module:function | reward_model:PATH
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # every run's `preftune train` settings (a partial TrainConfig, :func:`train_sections`): keys of its
    # `training` section, plus data.max_length / data.max_prompt_length and model.lora as `lora`; what is not
    # given keeps TrainConfig's default
    train: dict = field(default_factory=dict)
    methods: list[MethodRun] = field(default_factory=lambda: [MethodRun()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward_model: dict = field(default_factory=dict)  # `train` overrides for the learned reward model
    tune: TuneConfig | None = None  # None = no tuning: each run as configured, evaluated on held-out prompts
    progress: bool = True


def _preset_path(name: str) -> Path:
    return Path(str(resources.files("preftune.experiments") / "presets" / f"{name}.yaml"))


def load_experiment_config(spec: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """``spec`` is a preset name (:data:`PRESETS`) or a YAML path."""
    path = _preset_path(spec) if spec in PRESETS and not Path(spec).is_file() else Path(spec)
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
    if cfg.eval.pairs_mode not in PAIR_MODES:
        raise ConfigError(f"{source}: eval.pairs_mode must be all or best_vs_worst")
    _check_pairs(cfg.pairs, f"{source}: pairs")
    train_sections(cfg.train, f"{source}: train")
    if cfg.eval.temperature != 1.0 or cfg.eval.top_p != 1.0:
        raise ConfigError(
            f"{source}: eval.temperature and eval.top_p must be 1.0: the KL estimate needs samples from the "
            "model's own distribution"
        )
    if cfg.sample.k < 2:
        raise ConfigError(f"{source}: sample.k must be >= 2 to build pairs, got {cfg.sample.k}")
    _check_tune(cfg, source)
    if cfg.seeds is not None and (not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds)):
        raise ConfigError(f"{source}: seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    for i, run in enumerate(cfg.methods):
        _check_method(cfg, run, f"{source}: methods[{i}] ({run.method})")
    if any(run.reward == LEARNED for run in cfg.methods):  # its bad keys fail before any sampling too
        reward_model_config(cfg, output_dir="unused")
    names: set[str] = set()
    for planned in plan_runs(cfg):  # build every training config now: bad keys fail before any sampling
        train_config(cfg, planned.run, planned.beta, output_dir="unused", seed=planned.seed)
        if planned.name in names:
            raise ConfigError(
                f"{source}: two runs are both named {planned.name!r}; give them different options"
            )
        names.add(planned.name)
    return cfg


def _check_pairs(pairs: PairsConfig, where: str) -> None:
    if pairs.mode not in PAIR_MODES:
        raise ConfigError(f"{where}.mode must be all or best_vs_worst, got {pairs.mode!r}")
    if pairs.max_pairs is not None and pairs.max_pairs < 1:
        raise ConfigError(f"{where}.max_pairs must be >= 1 (or null for all pairs), got {pairs.max_pairs}")


def _check_method(cfg: ExperimentConfig, run: MethodRun, where: str) -> None:
    """What a `methods` entry may not say: checks that need the experiment around the entry."""
    try:
        method_kind(run.method)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if run.method == "reward_model":
        raise ConfigError(
            f"{where}: reward_model trains a scorer, not a policy, so it cannot be sampled "
            "and evaluated here; train it with `preftune train` and use it as `reward: reward_model:PATH`"
        )
    if "seed" in run.training:
        raise ConfigError(
            f"{where}: training.seed is set by the experiment (`seed`, or one run per entry of `seeds`); "
            "remove it from the methods entry"
        )
    if run.pairs and is_online(run):
        raise ConfigError(
            f"{where}: `pairs` is for offline methods only; {run.method} trains online from the training "
            "prompts and the reward, not from preference pairs"
        )
    if run.kto_data is not None and method_kind(run.method) != "unpaired":
        raise ConfigError(f"{where}: kto_data is for kto entries only (unpaired methods)")
    if run.kto_data is not None and run.kto_data not in KTO_DATA:
        raise ConfigError(f"{where}: kto_data must be one of {', '.join(KTO_DATA)}, got {run.kto_data!r}")
    if run.pairs and trains_on(run) == UNPAIRED:
        raise ConfigError(
            f"{where}: `pairs` applies to kto with `kto_data: pairs` only; with kto_data samples (the default) "
            "its records come from the samples, labelled by each prompt's median reward"
        )
    if run.pairs:
        _check_pairs(run_pairs(cfg, run, where), f"{where}: pairs")
    if run.reward is not None and (run.reward != LEARNED or not is_online(run)):
        raise ConfigError(
            f"{where}: `reward: {LEARNED}` (a reward model trained on the experiment's pairs, as in RLHF) is the "
            f"only value, and for online methods only; got {run.reward!r} on {run.method}"
        )
    if run.reward is not None and "rewards" in run.options:
        raise ConfigError(f"{where}: give either `reward: {LEARNED}` or `rewards`, not both")


LEARNED = "learned"
REWARD_MODEL_STAGE = "reward_model"
UNPAIRED_STAGE = "unpaired"  # KTO's records labelled by the median reward of each prompt's samples
KTO_DATA = ("samples", "pairs")
PROMPTS, PAIRS, UNPAIRED = "prompts", "pairs", "unpaired"  # what a run trains on (:func:`trains_on`)


def trains_on(run: MethodRun) -> str:
    """What a methods entry trains on: ``prompts`` (online methods: the training prompts and the reward),
    ``unpaired`` (kto with ``kto_data: samples``, the default: the ``unpaired`` stage's records) or ``pairs``
    (every other method, kto with ``kto_data: pairs`` included)."""
    kind = method_kind(run.method)
    if kind == "online":
        return PROMPTS
    if kind == "unpaired" and (run.kto_data or "samples") == "samples":
        return UNPAIRED
    return PAIRS


def is_online(run: MethodRun) -> bool:
    """Whether a methods entry trains online (from the training prompts and the reward)."""
    return method_kind(run.method) == "online"


def learned_reward_model(cfg: ExperimentConfig) -> str:
    """Where the learned reward model's weights are (the ``reward_model`` stage's run)."""
    return str(Path(cfg.output_dir) / REWARD_MODEL_STAGE / "run" / "model")


def reward_model_config(cfg: ExperimentConfig, *, output_dir: str) -> TrainConfig:
    """The ``preftune train`` config of the learned reward model: Bradley–Terry on the experiment's pairs
    with the shared `train` settings and the `reward_model` overrides (the data file is set by the pipeline)."""
    run = MethodRun(method="reward_model", training=dict(cfg.reward_model))
    return train_config(cfg, run, 0.0, output_dir=output_dir)


def experiment_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds each training run and its evaluation are repeated over: ``seeds``, or ``[seed]``."""
    return list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]


def run_pairs(cfg: ExperimentConfig, run: MethodRun, where: str = "methods entry") -> PairsConfig | None:
    """The pairs a run trains on: the experiment's `pairs` with the entry's `pairs` keys on top; None for
    an online method (it trains from prompts) and for kto on the median-labelled samples."""
    if trains_on(run) != PAIRS:
        return None
    try:
        return build_dataclass(PairsConfig, {**vars(cfg.pairs), **run.pairs}, prefix=f"{where}: pairs")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def pairs_suffix(default: PairsConfig, pairs: PairsConfig | None) -> str:
    """How a pairs setting differs from the experiment's default, as a name suffix: ``""`` (the same),
    ``"-all"``, ``"-n64"``, ``"-all-n64"``, ``"-nall"`` (no cap where the default has one)."""
    if pairs is None:
        return ""
    parts = [pairs.mode] if pairs.mode != default.mode else []
    if pairs.max_pairs != default.max_pairs:
        parts.append("nall" if pairs.max_pairs is None else f"n{pairs.max_pairs}")
    return "".join(f"-{p}" for p in parts)


def run_name(run: MethodRun, beta: float, suffix: str = "") -> str:
    """``<method><options><pairs suffix>-beta<β>``, e.g. ``odpo-alpha1.0-offsetlog-all-n48-beta0.1``."""
    extra = "".join(f"-{k}{v}" for k, v in sorted(run.options.items()) if k != "rewards")
    if run.reward is not None:
        extra += f"-rm{run.reward}"
    if run.kto_data is not None and run.kto_data != "samples":
        extra += f"-data{run.kto_data}"
    return f"{run.method}{extra}{suffix}-beta{beta:g}"


def seed_suffix(seed: int, seeds: list[int]) -> str:
    """``-seed<s>`` when the experiment has several seeds; nothing for one seed (today's stage names, so
    runs cached before `seeds` existed are reused)."""
    return f"-seed{seed}" if len(seeds) > 1 else ""


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the experiment and where it lives.

    ``label`` names the (method, options, pairs, beta) across seeds: one results row per label.
    ``name`` is the stage name under ``train/`` and ``eval/`` (``label`` plus ``-seed<s>`` with several
    seeds). ``pairs`` is None for online methods; ``pairs_variant`` is the pairs suffix without its dash
    (None on the experiment's default pairs). With a ``tune`` section each run is one candidate setting
    (its label ends in ``-lr<learning rate>``) and ``group`` is the label of the run it is a candidate for
    (SimPO's γ left out when γ/β is tuned): one setting per group is chosen. None without tuning."""

    name: str
    label: str
    run: MethodRun
    beta: float
    seed: int
    pairs: PairsConfig | None
    pairs_variant: str | None
    group: str | None = None

    @property
    def pairs_stage(self) -> str | None:
        """The stage holding this run's pairs (``pairs`` or ``pairs-<variant>``); None for online runs."""
        return None if self.pairs is None else stage_with_variant("pairs", self.pairs_variant)

    @property
    def data_stage(self) -> str:
        """The stage whose output this run trains on: ``prompts`` (online), ``unpaired`` (kto on the
        median-labelled samples) or its pairs stage."""
        kind = trains_on(self.run)
        return self.pairs_stage if kind == PAIRS else UNPAIRED_STAGE if kind == UNPAIRED else "prompts"

    @property
    def data_file(self) -> str:
        """The training data file, relative to the experiment's folder."""
        name = {PROMPTS: "train.txt", UNPAIRED: "unpaired.jsonl", PAIRS: "pairs.jsonl"}[trains_on(self.run)]
        return f"{self.data_stage}/{name}"


def stage_with_variant(stage: str, variant: str | None) -> str:
    return stage if variant is None else f"{stage}-{variant}"


def plan_runs(cfg: ExperimentConfig) -> list[PlannedRun]:
    """Every training run of the experiment, seed-major: every run of the first seed, then the next seed's
    (so an interrupted experiment has whole seeds trained). With a ``tune`` section, every candidate of
    every run (:func:`tune_candidates`)."""
    seeds = experiment_seeds(cfg)
    planned = []
    for seed in seeds:
        for run in cfg.methods:
            pairs = run_pairs(cfg, run)
            suffix = pairs_suffix(cfg.pairs, pairs)
            for beta in run.betas:
                for candidate, label, group in tune_candidates(cfg, run, beta, suffix):
                    planned.append(
                        PlannedRun(
                            name=label + seed_suffix(seed, seeds),
                            label=label,
                            run=candidate,
                            beta=beta,
                            seed=seed,
                            pairs=pairs,
                            pairs_variant=suffix[1:] or None,
                            group=group,
                        )
                    )
    return planned


def entry_tune(cfg: ExperimentConfig, run: MethodRun, where: str = "methods entry") -> TuneConfig | None:
    """A methods entry's tuning: the experiment's `tune` with the entry's `tune` keys on top; None without
    a `tune` section."""
    if cfg.tune is None:
        return None
    try:
        return build_dataclass(TuneConfig, {**vars(cfg.tune), **run.tune}, prefix=f"{where}: tune")
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def tune_candidates(
    cfg: ExperimentConfig, run: MethodRun, beta: float, suffix: str = ""
) -> list[tuple[MethodRun, str, str | None]]:
    """The candidate settings of one (entry, beta) as ``(methods entry, label, group)``: one per learning
    rate of the entry's `tune` (its own learning rate when none is listed) times, for SimPO, one per γ/β
    ratio (γ = ratio·β). Without a `tune` section: the entry itself, its usual label and no group.

    Example: ``learning_rates: [2e-5, 5e-5]`` on ``{method: dpo, betas: [0.1]}`` gives the labels
    ``dpo-beta0.1-lr2e-05`` and ``dpo-beta0.1-lr5e-05``, both of group ``dpo-beta0.1``."""
    tune = entry_tune(cfg, run)
    if tune is None:
        return [(run, run_name(run, beta, suffix), None)]
    lrs = tune.learning_rates or [run_training_value(cfg, run, "learning_rate")]
    ratios = tune.simpo_gamma_beta_ratios if run.method == "simpo" else None
    group_run = run
    if ratios:  # the group is named without the γ it tunes
        group_run = dataclasses.replace(run, options={k: v for k, v in run.options.items() if k != "gamma"})
    group = run_name(group_run, beta, suffix)
    out = []
    for lr in lrs:
        for ratio in ratios or [None]:
            options = run.options if ratio is None else {**run.options, "gamma": round(ratio * beta, 10)}
            candidate = dataclasses.replace(
                run, betas=[beta], options=options, training={**run.training, "learning_rate": lr}
            )
            out.append((candidate, f"{run_name(candidate, beta, suffix)}-lr{float(lr):g}", group))
    return out


def _check_tune(cfg: ExperimentConfig, source: str) -> None:
    fraction = cfg.prompts.validation_fraction
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"{source}: prompts.validation_fraction must be in [0, 1), got {fraction}")
    if cfg.tune is None:
        for i, run in enumerate(cfg.methods):
            if run.tune:
                raise ConfigError(
                    f"{source}: methods[{i}] ({run.method}) has `tune` keys but the experiment has no "
                    "`tune` section; add `tune: {}` (or its settings) to tune"
                )
        return
    if fraction == 0.0:
        raise ConfigError(
            f"{source}: tune chooses each run's setting on validation prompts, and there are none: set "
            "prompts.validation_fraction > 0 (e.g. 0.25); choosing on the held-out prompts would report the "
            "best of several tries as if it were one"
        )
    for i, run in enumerate(cfg.methods):
        where = f"{source}: methods[{i}] ({run.method})"
        tune = entry_tune(cfg, run, where)
        if tune.learning_rates is not None and (not tune.learning_rates or min(tune.learning_rates) <= 0):
            raise ConfigError(
                f"{where}: tune.learning_rates must be positive numbers, got {tune.learning_rates}"
            )
        ratios = tune.simpo_gamma_beta_ratios
        if ratios is not None and (not ratios or min(ratios) < 0):
            raise ConfigError(f"{where}: tune.simpo_gamma_beta_ratios must be numbers >= 0, got {ratios}")
        if "simpo_gamma_beta_ratios" in run.tune and run.method != "simpo":
            raise ConfigError(f"{where}: tune.simpo_gamma_beta_ratios is for simpo entries only")
        if tune.max_kl <= 0:
            raise ConfigError(f"{where}: tune.max_kl must be > 0 nats, got {tune.max_kl}")


def _split_method(entry: Any, i: int, source: str) -> dict:
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"{source}: methods[{i}] must be a mapping with a 'method' key")
    entry = dict(entry)
    out = {"method": entry.pop("method")}
    if "betas" in entry:
        out["betas"] = entry.pop("betas")
    if "beta" in entry:
        raise ConfigError(f"{source}: methods[{i}]: use 'betas: [...]' (a list), not 'beta'")
    for section in ("training", "generation", "pairs", "reward", "tune", "kto_data"):
        if section in entry:
            out[section] = entry.pop(section)
    out["options"] = entry
    return out


TRAIN_DATA_KEYS = ("max_length", "max_prompt_length")  # of `preftune train`'s data section
SET_BY_EXPERIMENT = ("output_dir", "seed", "progress")  # training keys the experiment sets per run


def train_sections(train: dict, where: str = "train") -> dict:
    """The experiment's ``train`` section as the sections of a partial :class:`TrainConfig`: ``{"training":
    {...}, "data": {max_length, max_prompt_length}, "model": {"lora": {...}}}`` holding only the keys given,
    each checked (name and type) against TrainConfig's own dataclasses, so every default is TrainConfig's.

    Example: ``{"batch_size": 8, "max_length": 64, "lora": {"enabled": True}}`` -> ``{"training":
    {"batch_size": 8}, "data": {"max_length": 64}, "model": {"lora": {"enabled": True}}}``."""
    fixed = sorted(set(train) & set(SET_BY_EXPERIMENT))
    if fixed:
        raise ConfigError(
            f"{where}: {', '.join(fixed)} set by the experiment (output_dir: its folder; seed: `seed` or "
            "`seeds`; progress: `progress`); remove them from `train`"
        )
    training_keys = {f.name for f in dataclasses.fields(TrainingConfig)} - set(SET_BY_EXPERIMENT)
    unknown = sorted(set(train) - training_keys - set(TRAIN_DATA_KEYS) - {"lora"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(u) for u in unknown)}; valid keys: those of `preftune "
            f"train`'s training section ({', '.join(sorted(training_keys))}), {', '.join(TRAIN_DATA_KEYS)} "
            "and lora"
        )
    out = {
        "training": {k: v for k, v in train.items() if k in training_keys},
        "data": {k: v for k, v in train.items() if k in TRAIN_DATA_KEYS},
        "model": {"lora": dict(train["lora"])} if isinstance(train.get("lora"), dict) else {},
    }
    if "lora" in train and not out["model"]:
        raise ConfigError(f"{where}.lora must be a mapping, got {train['lora']!r}")
    build_dataclass(TrainingConfig, out["training"], prefix=where)  # names and types, TrainConfig's checks
    build_dataclass(DataConfig, out["data"], prefix=where)
    build_dataclass(LoraConfig, out["model"].get("lora", {}), prefix=f"{where}.lora")
    return out


def train_dtype(cfg: ExperimentConfig) -> str:
    """The weights' dtype in training: `dtype` is the experiment's inference dtype, trained weights stay fp32
    (the frozen base under LoRA is stored in `dtype`)."""
    lora = build_dataclass(LoraConfig, train_sections(cfg.train)["model"].get("lora", {}))
    return cfg.dtype if lora.enabled else "float32"


def run_training_value(cfg: ExperimentConfig, run: MethodRun, key: str) -> Any:
    """A run's value of ``training.<key>``: the entry's, else the experiment's `train`, else TrainConfig's
    default."""
    training = {**train_sections(cfg.train)["training"], **run.training}
    return getattr(build_dataclass(TrainingConfig, training), key)


def train_config(
    cfg: ExperimentConfig, run: MethodRun, beta: float, *, output_dir: str, seed: int | None = None
) -> TrainConfig:
    """The ``preftune train`` config of one (method, beta, seed) run on the experiment's pairs (the data file
    is a placeholder; the pipeline points it at the run's pairs). ``seed`` defaults to the experiment's."""
    t = train_sections(cfg.train)
    online = is_online(run)
    placeholder = {PROMPTS: "prompts.txt", UNPAIRED: "unpaired.jsonl", PAIRS: "pairs.jsonl"}[trains_on(run)]
    raw = {
        "method": run.method,
        "model": {"name_or_path": cfg.model, "dtype": train_dtype(cfg), **t["model"]},
        "data": {"train": placeholder, **t["data"]},
        "training": {"output_dir": output_dir, "seed": cfg.seed if seed is None else seed, **t["training"]},
        run.method: dict(run.options) if run.method == "reward_model" else {"beta": beta, **run.options},
    }
    raw["training"].update(run.training)
    if online:  # trained on the training prompts, with the experiment's reward and sampling settings
        if run.reward == LEARNED:  # RLHF: trained against the learned reward, evaluated with the true one
            raw[run.method]["rewards"] = [f"reward_model:{learned_reward_model(cfg)}"]
        raw[run.method].setdefault("rewards", [cfg.reward])
        s = cfg.sample
        sampling = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
        raw["generation"] = {**sampling, "batch_size": s.batch_size, **run.generation}
    elif run.generation:
        raise ConfigError(f"methods entry {run.method}: `generation` is for online methods only")
    tcfg = train_config_from_dict(raw, source=f"methods entry {run.method} beta={beta}")
    tcfg.training.progress = cfg.progress  # not part of the raw dict: it must not change stage fingerprints
    return tcfg
