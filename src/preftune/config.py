"""Typed configuration: one dataclass per section, built from YAML plus ``dotted.key=value`` overrides.

Every key is declared here with its default. Unknown keys, wrong types and missing required values fail
with a :class:`ConfigError` that names the key; nothing is silently ignored. Only the section of the
selected ``method`` may be given (a ``simpo:`` section in a DPO run would be ignored, so it is an error).
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

TRACKERS = ("tensorboard", "wandb", "trackio")  # accelerate trackers training.report_to may name


class ConfigError(ValueError):
    """A bad configuration. The message names the key."""


DEFAULT_KL_HORIZON_BATCHES = 20.0  # ppo.kl_horizon_batches


# --- model and data -------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge: bool = False  # also save the adapter merged into the base weights, in <run_dir>/model_merged/


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    # storage dtype of the weights that stay frozen (the LoRA base); trained weights are always float32:
    # for half-precision compute set training.mixed_precision
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    disable_dropout: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ColumnsConfig:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"
    margin: str = "margin"
    completion: str = "completion"  # unpaired data (kto)
    label: str = "label"  # unpaired data (kto): true = desirable


@dataclass
class DataConfig:
    train: str | None = None  # required: file, save_to_disk folder or hub id
    eval: str | None = None
    eval_fraction: float = 0.0  # used only when `eval` is not given; splits by prompt
    split: str = "train"  # split of `train` for hub datasets / DatasetDict folders
    eval_split: str = "test"  # split of `eval` for hub datasets / DatasetDict folders
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 512
    max_prompt_length: int = 256
    # keep the tokenised examples of a data file on disk ($PREFTUNE_CACHE/tokens, memory-mapped), keyed on the
    # file's content, the tokenizer and these settings: a second run skips reading and tokenising (token_cache.py)
    token_cache: bool = True
    # read, validate and tokenise the training records as they are consumed, never all held (data/stream.py);
    # every method (online ones: their prompt files); needs training.max_steps; the shuffle is a seeded buffer
    # of shuffle_buffer records
    streaming: bool = False
    shuffle_buffer: int = 10000  # records held for the streamed shuffle (1: the file's order)


@dataclass
class GenerationConfig:
    """How responses are sampled (the experiment's ``sample``/``eval`` sections and online methods share it).

    temperature 1 and top_p 1 are plain ancestral sampling from the model (what a KL estimate from the
    samples needs); temperature 0 is greedy.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # sequences per generate call


# --- training -------------------------------------------------------------------------------------------


@dataclass
class TrainingConfig:
    output_dir: str = "runs/preftune"
    seed: int = 0
    batch_size: int = 4  # pairs per micro-batch per process
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # optimizer steps; 0 = only at the end (when there is eval data)
    eval_batch_size: int = 8
    save_every: int = 0  # optimizer steps; 0 = only the final model
    keep_checkpoints: int = 2
    log_every: int = 1
    precompute_ref: bool = True  # compute reference log-probs once before training
    # no | bf16 | fp16: autocast over fp32 master weights (fp16: loss scaling, GPU)
    mixed_precision: str = "no"
    # a NaN/inf loss or gradient norm: false = stop naming the records, true = skip the step
    skip_nonfinite: bool = False
    share_prefix: bool = True  # encode a prompt once for all its responses (pairs, GRPO groups)
    ref_cache: bool = True  # reuse precomputed reference log-probs across runs ($PREFTUNE_CACHE/ref_logps)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% slower
    group_by_length: bool = False  # shuffle, then sort windows of 50 micro-batches by length: less padding
    report_to: list[str] = field(default_factory=list)  # tensorboard | wandb | trackio (accelerate trackers)
    # none: every process holds the whole model (DDP); fsdp: parameters, gradients and optimizer state sharded
    # over the processes (torch FSDP2, one unit per decoder layer plus the root; training/sharding.py)
    sharding: str = "none"
    cpu_offload: bool = False  # fsdp only: parameters and optimizer state live on the CPU between uses
    # fsdp only: free each decoder layer's gathered parameters after its forward (gathered again for the
    # backward: the least memory); false keeps them until the backward (ZeRO-2: faster, the full model's
    # parameters held per process during a forward/backward)
    reshard_after_forward: bool = True
    # offline methods: split each micro-batch into forward/backward passes of at most this many padded tokens
    # (rows × longest row, as the layout runs them); the step's records and loss stay the same (training/loop.py)
    max_tokens_per_batch: int | None = None
    progress: bool = True


# --- methods: one section each --------------------------------------------------------------------------
# Every method is one section class below, registered in METHOD_SECTIONS by its `method:` name. A section
# says what kind of method it is (pair | unpaired | reward_model | online), whether it uses π_ref, and its own
# checks; option fields take their vocabularies from preftune.losses (`option(...)`), so a value list is
# written once. Nothing else switches on method names: trainers are preftune.training.run.TRAINERS.


def option(default: str | None, vocabulary: str):
    """A string field whose value must be one of ``preftune.losses.<vocabulary>`` (checked when the config is
    built; ``None`` passes, for a default the section fills in)."""
    return field(default=default, metadata={"vocabulary": vocabulary})


def _losses():
    import importlib  # here: the config module stays importable without torch

    return importlib.import_module("preftune.losses")


class MethodSection:
    """What every method's section declares. ``kind``: how it trains (pair | unpaired | reward_model |
    online); ``summary``: one line for ``preftune --help`` and the docs; ``renamed``: old key -> new key,
    accepted for one release with a FutureWarning."""

    method: ClassVar[str]
    kind: ClassVar[str]
    summary: ClassVar[str]
    renamed: ClassVar[dict[str, str]] = {}
    requires_scores: ClassVar[bool] = False  # the data must have score_chosen / score_rejected (ODPO)

    def uses_reference(self) -> bool:
        """Whether π_ref is loaded and run for this section's settings."""
        raise NotImplementedError

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) pairs; a message names its key as ``<method>.<field>``."""
        return []

    def to_section(self) -> dict:
        """The section as YAML holds it (:meth:`TrainConfig.to_dict`): a key that was unset (null) and filled in
        from the others (:meth:`_fill_unset`) is written null again, so a config rebuilt with another
        ``policy_loss`` or ``baseline`` fills it from that one (a GSPO run never inherits clip's 0.2)."""
        unset = getattr(self, "_unset", frozenset())
        return {k: None if k in unset else v for k, v in dataclasses.asdict(self).items()}

    def _fill_unset(self, values: dict) -> None:
        """Set every key of ``values`` that is None to its value there, remembering which were unset."""
        self._unset = frozenset(k for k in values if getattr(self, k) is None)
        for key in self._unset:
            setattr(self, key, values[key])


@dataclass
class PairSection(MethodSection):
    """A pair method: its fields are exactly its loss's keyword parameters (``losses.PAIR_METHODS``)."""

    kind: ClassVar[str] = "pair"

    def uses_reference(self) -> bool:
        return not _losses().PAIR_METHODS[self.method].reference_free

    def checks(self) -> list[tuple[bool, str]]:
        beta = getattr(self, "beta", 1.0)
        return [(beta > 0, f"{self.method}.beta must be > 0, got {beta}")]


@dataclass
class DPOConfig(PairSection):
    method: ClassVar[str] = "dpo"
    summary: ClassVar[str] = "DPO (Rafailov et al. 2023); label_smoothing > 0: conservative DPO (cDPO)"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (
                0.0 <= self.label_smoothing < 0.5,
                f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}",
            )
        ]


@dataclass
class IPOConfig(PairSection):
    method: ClassVar[str] = "ipo"
    summary: ClassVar[str] = "IPO (Azar et al. 2023): squared loss towards a margin of 1/(2β)"
    beta: float = 0.1


@dataclass
class HingeConfig(PairSection):
    method: ClassVar[str] = "hinge"
    summary: ClassVar[str] = "hinge loss on the DPO margin (SLiC-style)"
    beta: float = 0.1


@dataclass
class RPOConfig(PairSection):
    method: ClassVar[str] = "rpo"
    summary: ClassVar[str] = "DPO + NLL on the chosen response (RPO, Pang et al. 2024)"
    beta: float = 0.1
    alpha: float = 1.0

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [(self.alpha >= 0, f"rpo.alpha must be >= 0, got {self.alpha}")]


@dataclass
class ODPOConfig(PairSection):
    method: ClassVar[str] = "odpo"
    summary: ClassVar[str] = "ODPO (Amini et al. 2024): DPO with an offset from the two responses' scores"
    requires_scores: ClassVar[bool] = True
    beta: float = 0.1
    alpha: float = 1.0
    offset: str = option("log", "ODPO_OFFSETS")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [(self.alpha >= 0, f"odpo.alpha must be >= 0, got {self.alpha}")]


@dataclass
class SimPOConfig(PairSection):
    method: ClassVar[str] = "simpo"
    summary: ClassVar[str] = (
        "SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin"
    )
    beta: float = 2.0
    gamma: float = 1.0  # absolute target margin (the paper's gamma/beta ratio times beta)


@dataclass
class ORPOConfig(PairSection):
    method: ClassVar[str] = "orpo"
    summary: ClassVar[str] = "ORPO (Hong et al. 2024): chosen NLL + odds-ratio term, reference-free"
    beta: float = 0.1  # the paper's lambda: odds-ratio term weight next to the chosen NLL (TRL's default)


@dataclass
class KTOConfig(MethodSection):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired data (prompt, completion, label), or pairs
    split into one desirable and one undesirable record each (losses/kto.py, training/kto.py)."""

    method: ClassVar[str] = "kto"
    kind: ClassVar[str] = "unpaired"
    summary: ClassVar[str] = "KTO (Ethayarajh et al. 2024) on unpaired good/bad examples (or pairs)"
    beta: float = 0.1
    desirable_weight: float = 1.0  # lambda_D; 0 trains on the undesirable records only
    undesirable_weight: float = 1.0  # lambda_U; 0 trains on the desirable records only

    def uses_reference(self) -> bool:
        return True  # r = log π_θ − log π_ref

    def checks(self) -> list[tuple[bool, str]]:
        d, u = self.desirable_weight, self.undesirable_weight
        return [
            (self.beta > 0, f"kto.beta must be > 0, got {self.beta}"),
            (d >= 0 and u >= 0, "kto.desirable_weight and kto.undesirable_weight must be >= 0"),
            (
                d > 0 or u > 0,
                "kto.desirable_weight and kto.undesirable_weight are both 0: nothing would be trained",
            ),
        ]


@dataclass
class RewardModelConfig(MethodSection):
    method: ClassVar[str] = "reward_model"
    kind: ClassVar[str] = "reward_model"
    summary: ClassVar[str] = "Bradley–Terry reward model (a scalar head) from pairs"
    use_margin: bool = True  # subtract the data's `margin` column when present

    def uses_reference(self) -> bool:
        return False


@dataclass
class OnlineSection(MethodSection):
    """An online method: trained from prompts and reward functions, with the ``generation`` section. One batch
    of samples is ``prompts_per_batch`` prompts (all processes together) × ``completions_per_prompt``
    completions and serves ``updates_per_batch`` optimizer steps; a section gives these as fields or
    properties. π_ref is used exactly when ``beta`` > 0 (the KL term)."""

    kind: ClassVar[str] = "online"
    beta: float = 0.0
    rewards: list = field(default_factory=lambda: ["vader"])  # names or {name, weight, options} mappings
    eval_samples_per_prompt: int = 2  # held-out completions per eval prompt (reward, KL)
    log_completions_every: int = 10  # optimizer steps between completions.jsonl samples; 0 = never

    def uses_reference(self) -> bool:
        return self.beta > 0

    def checks(self) -> list[tuple[bool, str]]:
        m = self.method
        return [
            (
                self.prompts_per_batch >= 1,
                f"{m}.prompts_per_batch must be >= 1, got {self.prompts_per_batch}",
            ),
            (self.beta >= 0, f"{m}.beta must be >= 0, got {self.beta}"),
            (bool(self.rewards), f"{m}.rewards must name at least one reward function"),
            (self.eval_samples_per_prompt >= 1, f"{m}.eval_samples_per_prompt must be >= 1"),
            (self.log_completions_every >= 0, f"{m}.log_completions_every must be >= 0"),
        ]

    def processes_checks(self, num_processes: int) -> list[tuple[bool, str]]:
        """Checks that depend on the number of processes (made when the process group is known)."""
        return [
            (
                self.prompts_per_batch % num_processes == 0,
                f"{self.method}.prompts_per_batch ({self.prompts_per_batch}) must be a multiple of the number "
                f"of processes ({num_processes})",
            )
        ]


@dataclass
class GRPOConfig(OnlineSection):
    """GRPO and its variants (see :mod:`preftune.losses.policy_gradient` for each option's paper)."""

    method: ClassVar[str] = "grpo"
    summary: ClassVar[str] = "GRPO and its variants: DAPO, Dr. GRPO, RLOO, GSPO, CISPO (grpo.policy_loss)"
    renamed: ClassVar[dict[str, str]] = {
        "group_size": "completions_per_prompt",
        "prompts_per_step": "prompts_per_batch",
        "iterations": "updates_per_batch",
    }
    completions_per_prompt: int = 8  # G completions per prompt (a group)
    prompts_per_batch: int = 4  # P prompts per batch of samples, all processes together
    updates_per_batch: int = (
        1  # μ optimizer steps per batch of samples, each over all of it (μ > 1: π_old != π_θ)
    )
    beta: float = 0.0  # KL coefficient; 0 = no reference model in training (eval rows' KL: one made then)
    kl: str = option("k3", "KL_ESTIMATORS")  # k3 (paper) | k2; k1 only at beta 0 (zero expected gradient)
    # clip (paper) | gspo (sequence ratio) | cispo (clipped, detached IS weight)
    policy_loss: str = option("clip", "POLICY_LOSSES")
    # clip range 1 − epsilon_low .. 1 + epsilon_high of the ratio; unset (null): the policy loss's own, clip
    # 0.2 / 0.2 (paper; DAPO's clip-higher: epsilon_high 0.28), gspo 3e-4 / 4e-4 (paper), cispo 1.0 (no
    # lower bound) / 4.0 (weight capped at 5)
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    # group | batch | none (Dr. GRPO); unset (null): group, or none with baseline leave_one_out (RLOO)
    scale: str | None = option(None, "SCALES")
    baseline: str = option("mean", "BASELINES")  # mean | leave_one_out (RLOO)
    # token_mean (DAPO) | sequence_mean (paper) | constant (Dr. GRPO); unset (null): the policy loss's own,
    # token_mean for clip and cispo, sequence_mean for gspo
    aggregation: str | None = option(None, "AGGREGATIONS")
    mask_truncated: bool = False  # leave completions cut at max_new_tokens out of the loss
    # DAPO's dynamic sampling: groups whose rewards have no spread are replaced by more sampled groups, at
    # most dynamic_sampling_max_rounds extra rounds of prompts_per_batch prompts (training/dynamic.py)
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3

    _OWN: ClassVar[tuple[str, ...]] = ("epsilon_low", "epsilon_high", "aggregation")  # the policy loss's own

    def _defaults(self) -> dict:
        """What an unset (null) key means with this section's policy_loss and baseline."""
        own = _losses().POLICY_LOSSES.get(self.policy_loss)  # an unknown name is refused when built
        # RLOO divides by no std: with scale: group, leave_one_out would be GRPO × G/(G−1), not RLOO
        out = {"scale": "none" if self.baseline == "leave_one_out" else "group"}
        return {**out, **({key: getattr(own, key) for key in self._OWN} if own is not None else {})}

    def __post_init__(self) -> None:
        self._fill_unset(self._defaults())

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (
                self.completions_per_prompt >= 2,
                "grpo.completions_per_prompt must be >= 2 (group advantages compare completions), got "
                f"{self.completions_per_prompt}",
            ),
            (
                self.updates_per_batch >= 1,
                f"grpo.updates_per_batch must be >= 1, got {self.updates_per_batch}",
            ),
            (
                self.dynamic_sampling_max_rounds >= 1,
                f"grpo.dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}",
            ),
            (
                self.kl != "k1" or self.beta == 0,
                f"grpo.kl: k1 with grpo.beta > 0 ({self.beta}) is refused: as a loss term k1 = log π_θ − log "
                "π_ref has zero expected gradient (E_{y~π_θ}[∇log π_θ(y)] = Σ_y ∇π_θ(y) = 0), so it pulls "
                "nowhere and only adds noise to the gradient and changes the logged kl. Use k3 (the paper's; "
                "its gradient is that of KL(π_ref‖π_θ)) or k2 (the gradient of KL(π_θ‖π_ref)); k1 stays "
                "available as PPO's reward shaping (ppo.kl)",
            ),
            (
                0 <= self.epsilon_low
                and (self.epsilon_low < 1 or self.policy_loss == "cispo")
                and self.epsilon_high >= 0,
                "grpo.epsilon_low must be in [0, 1) (>= 0 for cispo, where >= 1 means no lower bound on the "
                "weight), epsilon_high >= 0",
            ),
        ]


@dataclass
class PPOConfig(OnlineSection):
    """PPO-based RLHF with a value head on the policy's trunk (see :mod:`preftune.losses.ppo` for each piece's
    equation and docs/methods.md for the critic's design). One batch of ``prompts_per_batch`` ×
    ``completions_per_prompt`` rollouts serves ``epochs`` × ``minibatches`` optimizer steps."""

    method: ClassVar[str] = "ppo"
    summary: ClassVar[str] = "PPO-based RLHF with a value head and KL-shaped reward (Ziegler et al. 2019)"
    renamed: ClassVar[dict[str, str]] = {"samples_per_prompt": "completions_per_prompt"}
    prompts_per_batch: int = 32  # rollouts' prompts per batch of samples, all processes together
    completions_per_prompt: int = 1  # completions of each prompt (> 1 shares the prompt's encoding)
    epochs: int = 2  # PPO epochs over each batch of rollouts
    minibatches: int = 2  # optimizer steps per epoch (the batch is split into this many minibatches)
    beta: float = 0.05  # KL coefficient of the shaped reward (the initial one when adaptive_kl)
    kl: str = option("k1", "PPO_KL_ESTIMATORS")  # per-token KL estimator in the reward: k1 (the papers') | k3
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards target_kl
    target_kl: float = 6.0  # nats per completion
    # the adaptive β's horizon, in batches of rollouts: after each batch β ← β·(1 + clip(KL/target − 1,
    # ±0.2)/horizon); 20 keeps Ziegler et al.'s rate per batch (their 10000 completions at 512 a batch)
    kl_horizon_batches: float | None = None  # unset (null): 20
    kl_horizon: int | None = None  # deprecated (this release only): the horizon in completions
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE λ
    epsilon: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # value-loss coefficient
    entropy_coef: float = 0.0  # entropy bonus coefficient (0 = none)
    whiten_advantages: bool = True
    value_learning_rate: float | None = None  # the value head's; None = 10 × training.learning_rate

    def __post_init__(self) -> None:
        if self.kl_horizon is not None:  # the old key, in completions: the same rate per batch, in batches
            if self.kl_horizon_batches is not None:  # (set to any value, 20 too)
                raise ConfigError(
                    "ppo.kl_horizon (deprecated, in completions) and ppo.kl_horizon_batches are both set: "
                    "keep ppo.kl_horizon_batches"
                )
            per_batch = max(self.prompts_per_batch * self.completions_per_prompt, 1)
            self.kl_horizon_batches = self.kl_horizon / per_batch
            warnings.warn(
                f"ppo.kl_horizon is deprecated and will be removed in the next release: the horizon is now "
                f"ppo.kl_horizon_batches, in batches of rollouts; {self.kl_horizon} completions at "
                f"{per_batch} a batch read as kl_horizon_batches: {self.kl_horizon_batches:g}",
                FutureWarning,
                stacklevel=2,
            )
            self.kl_horizon = None
        self._fill_unset({"kl_horizon_batches": DEFAULT_KL_HORIZON_BATCHES})

    @property
    def updates_per_batch(self) -> int:
        return self.epochs * self.minibatches

    def checks(self) -> list[tuple[bool, str]]:
        p = self
        return super().checks() + [
            (
                p.completions_per_prompt >= 1,
                f"ppo.completions_per_prompt must be >= 1, got {p.completions_per_prompt}",
            ),
            (p.epochs >= 1 and p.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1"),
            (
                p.prompts_per_batch % p.minibatches == 0,
                f"ppo.prompts_per_batch ({p.prompts_per_batch}) must be a multiple of ppo.minibatches "
                f"({p.minibatches}): every minibatch takes the same number of prompts",
            ),
            (
                p.target_kl > 0 and p.kl_horizon_batches > 0,
                "ppo.target_kl and ppo.kl_horizon_batches must be > 0",
            ),
            (not p.adaptive_kl or p.beta > 0, "ppo.adaptive_kl needs a starting ppo.beta > 0"),
            (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]"),
            (0 < p.epsilon < 1, f"ppo.epsilon must be in (0, 1), got {p.epsilon}"),
            (p.value_clip > 0, f"ppo.value_clip must be > 0, got {p.value_clip}"),
            (p.vf_coef > 0, f"ppo.vf_coef must be > 0 (the critic must learn), got {p.vf_coef}"),
            (p.entropy_coef >= 0, f"ppo.entropy_coef must be >= 0, got {p.entropy_coef}"),
            (
                p.value_learning_rate is None or p.value_learning_rate > 0,
                "ppo.value_learning_rate must be > 0 (or null for 10 × training.learning_rate)",
            ),
        ]

    def processes_checks(self, num_processes: int) -> list[tuple[bool, str]]:
        per = self.prompts_per_batch // num_processes if self.prompts_per_batch % num_processes == 0 else 0
        return super().processes_checks(num_processes) + [
            (
                not per or per % self.minibatches == 0,
                f"ppo.prompts_per_batch ({self.prompts_per_batch}) must be a multiple of ppo.minibatches × "
                f"processes ({self.minibatches} × {num_processes}): each process splits its share into "
                "ppo.minibatches equal minibatches",
            )
        ]


@dataclass
class OnlineDPOConfig(OnlineSection):
    """Online DPO (Guo et al. 2024, arXiv 2402.04792): per prompt two completions of the current policy,
    the higher-reward one chosen (ties and pairs with a missing reward skipped), the DPO or IPO loss against
    π_ref (training/online_dpo.py). One batch of ``prompts_per_batch`` prompts × 2 completions is one
    optimizer step."""

    method: ClassVar[str] = "online_dpo"
    summary: ClassVar[str] = "online DPO (Guo et al. 2024): pairs sampled from the policy, ranked by a reward"
    beta: float = 0.1  # the DPO β (IPO's τ); > 0: π_ref is always used
    loss: str = option("sigmoid", "ONLINE_DPO_LOSSES")  # sigmoid (DPO) | ipo
    prompts_per_batch: int = 8  # prompts (pairs) per optimizer step, all processes together

    # two completions per prompt, one update per batch (on-policy)
    @property
    def completions_per_prompt(self) -> int:
        return 2

    @property
    def updates_per_batch(self) -> int:
        return 1

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.beta > 0, f"online_dpo.beta must be > 0 (the DPO loss is against π_ref), got {self.beta}")
        ]


MIXED_PRECISION = ("no", "bf16", "fp16")
SHARDING = ("none", "fsdp")
KINDS = ("pair", "unpaired", "reward_model", "online")

# the method registry: `method:` name -> its section (which says its kind, reference use and checks)
METHOD_SECTIONS: dict[str, type[MethodSection]] = {
    cls.method: cls
    for cls in (
        DPOConfig,
        IPOConfig,
        HingeConfig,
        RPOConfig,
        ODPOConfig,
        SimPOConfig,
        ORPOConfig,
        KTOConfig,
        RewardModelConfig,
        GRPOConfig,
        PPOConfig,
        OnlineDPOConfig,
    )
}
# trained from prompts and reward functions, with the `generation` section
ONLINE_METHODS = tuple(name for name, cls in METHOD_SECTIONS.items() if cls.kind == "online")


def method_kind(method: str) -> str:
    """``pair`` | ``unpaired`` | ``reward_model`` | ``online`` for a registered method name."""
    if method not in METHOD_SECTIONS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHOD_SECTIONS)}")
    return METHOD_SECTIONS[method].kind


@dataclass
class TrainConfig:
    method: str = "dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # online methods only
    # the `method`'s section (in YAML under the method's name: `dpo: {beta: 0.1}`); cfg.dpo reads it too
    method_config: MethodSection | None = None

    def __post_init__(self) -> None:
        if self.method_config is None and self.method in METHOD_SECTIONS:
            self.method_config = METHOD_SECTIONS[self.method]()

    def __getattr__(self, name: str) -> Any:
        # cfg.grpo: the section when grpo is the method, None for another registered method
        if name in METHOD_SECTIONS:
            return self.__dict__.get("method_config") if self.__dict__.get("method") == name else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self, *, resolved: bool = False) -> dict:
        """The config as YAML would hold it: the method's section under its name (``resolved``: its unset keys
        as filled in, what trains: for comparing runs); the generation section of an offline method left out."""
        out = dataclasses.asdict(self)
        out.pop("method_config")
        section = dataclasses.asdict(self.method_config) if resolved else self.method_config.to_section()
        if self.method not in ONLINE_METHODS:
            out.pop("generation")
        return {**out, self.method: section}


# --- building from dicts --------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None:
        raise ConfigError(f"{key}: a value is required (got null)")
    if tp is list:  # free-form list (e.g. reward specs), checked by whoever consumes it
        if isinstance(value, list):
            return list(value)
        return [value]
    if tp is dict:  # free-form mapping, checked by whoever consumes it
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Build ``cls`` from ``values``; unknown keys and bad types raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(u) for u in unknown)} in {where}; valid keys: {', '.join(sorted(names))}"
        )
    vocabularies = {
        f.name: f.metadata["vocabulary"] for f in dataclasses.fields(cls) if "vocabulary" in f.metadata
    }
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
        if name in vocabularies and kwargs[name] is not None:
            allowed = tuple(getattr(_losses(), vocabularies[name]))
            if kwargs[name] not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {kwargs[name]!r}")
    return cls(**kwargs)


def build_section(method: str, values: dict) -> MethodSection:
    """The section of ``method`` from ``values``, old key names (the section's ``renamed``) read with a
    FutureWarning for one release."""
    cls = METHOD_SECTIONS[method]
    values = dict(values)
    for old, new in cls.renamed.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(
                f"{method}.{old} (the old name of {method}.{new}) and {method}.{new} are both set"
            )
        warnings.warn(
            f"{method}.{old} is renamed {method}.{new}; the old name is read for this release only",
            FutureWarning,
            stacklevel=3,
        )
        values[new] = values.pop(old)
    return build_dataclass(cls, values, prefix=method)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def train_config_from_dict(raw: dict, *, source: str = "config") -> TrainConfig:
    raw = dict(raw)
    method = raw.get("method", "dpo")
    if method not in METHOD_SECTIONS:
        raise ConfigError(f"{source}: method {method!r} is not one of {', '.join(METHOD_SECTIONS)}")
    others = [m for m in METHOD_SECTIONS if m != method and raw.get(m) is not None]
    if others:
        raise ConfigError(
            f"{source}: section(s) {', '.join(others)} given but method is {method!r}; "
            "they would be ignored, so remove them or change `method`"
        )
    training = raw.get("training")
    if isinstance(training, dict) and training.get("mixed_precision") is False:
        raw["training"] = {**training, "mixed_precision": "no"}  # YAML 1.1 reads a bare `no` as false
    if method not in ONLINE_METHODS and raw.get("generation") is not None:
        raise ConfigError(
            f"{source}: section generation is for online methods ({', '.join(ONLINE_METHODS)}); "
            f"{method!r} trains on fixed pairs and would ignore it"
        )
    section = raw.pop(method, None) or {}
    for other in METHOD_SECTIONS:  # sections set to null (an override that switched the method)
        if raw.get(other, 0) is None:
            del raw[other]
    if "method_config" in raw:
        raise ConfigError(f"{source}: unknown key 'method_config'; the method's section is `{method}:`")
    try:
        if not isinstance(section, dict):
            raise ConfigError(f"{method}: expected a mapping (section), got {section!r}")
        cfg = build_dataclass(TrainConfig, raw)
        cfg.method_config = build_section(method, section)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate_train_config(cfg, source)
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    raw = apply_overrides(read_yaml(path), overrides or [])
    return train_config_from_dict(raw, source=str(path))


def load_config(config: TrainConfig | dict | str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig` from a YAML path, a dict (as the YAML would hold it) or a TrainConfig,
    with ``dotted.key=value`` overrides applied. Every API that takes a config accepts all three."""
    import copy

    if isinstance(config, TrainConfig):  # rebuilt, so a field set by hand is checked like a file's
        return train_config_from_dict(apply_overrides(config.to_dict(), overrides or []))
    if isinstance(config, dict):
        return train_config_from_dict(apply_overrides(copy.deepcopy(config), overrides or []))
    if isinstance(config, (str, Path)):
        return load_train_config(config, overrides)
    raise ConfigError(f"a config is a TrainConfig, a dict or a YAML path, not {type(config).__name__}")


def validate_train_config(cfg: TrainConfig, source: str = "config") -> None:
    def bad(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if not cfg.data.train:
        bad("data.train is required (a JSONL/JSON/CSV/Parquet file, a save_to_disk folder or a hub id)")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        bad(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.data.shuffle_buffer < 1:
        bad(f"data.shuffle_buffer must be >= 1 (1 keeps the file's order), got {cfg.data.shuffle_buffer}")
    if cfg.data.streaming:
        _check_streaming(cfg, bad)
    if cfg.method in ONLINE_METHODS:
        d, n = cfg.data, cfg.generation.max_new_tokens
        if d.max_prompt_length < 1 or d.max_prompt_length + n > d.max_length:
            bad(
                f"data.max_prompt_length ({d.max_prompt_length}) + generation.max_new_tokens ({n}) must be at most "
                f"data.max_length ({d.max_length}): a prompt and its completion must fit"
            )
    elif cfg.data.max_prompt_length >= cfg.data.max_length:
        bad(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be below data.max_length ({cfg.data.max_length})"
        )
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        bad(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.training.mixed_precision not in MIXED_PRECISION:
        bad(
            f"training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {cfg.training.mixed_precision!r}"
        )
    if cfg.model.dtype != "float32" and not cfg.model.lora.enabled:
        half = {"bfloat16": "bf16", "float16": "fp16"}[cfg.model.dtype]
        bad(
            f"model.dtype: {cfg.model.dtype} with full fine-tuning would train {cfg.model.dtype} weights directly, "
            f"and at preference-tuning learning rates most updates round away. Set model.dtype: float32 and "
            f"training.mixed_precision: {half} (fp32 master weights, {half} compute); half-precision storage is "
            "for frozen weights only (the base model under lora.enabled: true)"
        )
    t = cfg.training
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_batch_size"):
        if getattr(t, name) < 1:
            bad(f"training.{name} must be >= 1, got {getattr(t, name)}")
    if t.max_steps is not None and t.max_steps < 1:
        bad(f"training.max_steps must be >= 1, got {t.max_steps}")
    if t.learning_rate <= 0:
        bad(f"training.learning_rate must be > 0, got {t.learning_rate}")
    if t.lr_scheduler not in ("linear", "cosine", "constant"):
        bad(f"training.lr_scheduler must be linear, cosine or constant, got {t.lr_scheduler!r}")
    if len(t.adam_betas) != 2:
        bad("training.adam_betas must have two values")
    if t.sharding not in SHARDING:
        bad(f"training.sharding must be one of {', '.join(SHARDING)}, got {t.sharding!r}")
    if t.cpu_offload and t.sharding != "fsdp":
        bad("training.cpu_offload needs training.sharding: fsdp (it offloads the shards)")
    if not t.reshard_after_forward and t.sharding != "fsdp":
        bad("training.reshard_after_forward: false needs training.sharding: fsdp (it keeps gathered shards)")
    if t.max_tokens_per_batch is not None:
        if t.max_tokens_per_batch < 1:
            bad(f"training.max_tokens_per_batch must be >= 1, got {t.max_tokens_per_batch}")
        if cfg.method in ONLINE_METHODS:
            bad(
                f"training.max_tokens_per_batch applies to the offline methods only; {cfg.method} processes a "
                "step's completions training.batch_size at a time (whole groups): lower training.batch_size instead"
            )
    for name in t.report_to:
        if name not in TRACKERS:
            bad(f"training.report_to: unknown tracker {name!r} ({', '.join(TRACKERS)})")
    checks = list(cfg.method_config.checks())
    if cfg.method in ONLINE_METHODS:
        checks += _online_checks(cfg)
    for ok, message in checks:
        if not ok:
            bad(message)


def _check_streaming(cfg: TrainConfig, bad) -> None:
    """What ``data.streaming: true`` needs (data/stream.py): a step count, and nothing that needs the whole set."""
    d, t, kind = cfg.data, cfg.training, cfg.method_config.kind
    if kind == "online" and getattr(cfg.method_config, "dynamic_sampling", False):
        bad(
            f"{cfg.method}.dynamic_sampling draws its extra prompts from the whole prompt set, which "
            "data.streaming never holds; set one of them to false"
        )
    if t.max_steps is None:
        bad(
            "data.streaming: true needs training.max_steps: a stream has no length to count epochs over "
            "(it starts a new pass, reshuffled, when the data runs out)"
        )
    if d.eval_fraction > 0:
        bad(
            "data.eval_fraction needs the whole training set to split it by prompt; with data.streaming give a "
            "held-out file as data.eval instead"
        )
    if t.group_by_length:
        bad("training.group_by_length sorts the whole set by length; it does not apply with data.streaming")


def _online_checks(cfg: TrainConfig) -> list[tuple[bool, str]]:
    """What every online method needs of the generation and training sections."""
    gen, t, name = cfg.generation, cfg.training, cfg.method
    return [
        (
            gen.max_new_tokens >= 1 and gen.batch_size >= 1,
            "generation.max_new_tokens and batch_size must be >= 1",
        ),
        (
            gen.temperature > 0,
            f"generation.temperature must be > 0 for {name} (it learns from samples of the policy; greedy "
            "completions are not)",
        ),
        (0 < gen.top_p <= 1, f"generation.top_p must be in (0, 1], got {gen.top_p}"),
        (
            gen.top_p >= 1,
            f"generation.top_p must be 1 for {name}, got {gen.top_p}: the log-probs it trains on (the ratio, the "
            "KL, the entropy) are of softmax(z/T) over the whole vocabulary, and nothing renormalises them to the "
            "nucleus, so they would be of another distribution than the one sampled",
        ),
        (
            t.grad_accum == 1,
            f"training.grad_accum is not used by online methods: a step's completions are processed "
            f"training.batch_size at a time ({name}'s section sets how many there are); leave grad_accum at 1",
        ),
    ]


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)
