"""What every stage of the experiment shares: the config, the folder, the model, tokenizer and reward, and
the cached-stage helpers (:mod:`.stages`) with the code version added to every stage's inputs.

Device and precision follow the training runs' policy, decided in one place: the process's device
(:func:`preftune.rewards.process_device`, accelerate's when it is set up) and the autocast of
``train.mixed_precision`` (:func:`preftune.models.autocast`, what accelerate enters in training) over the
weights as loaded, for sampling, the reference and the evaluation passes alike."""

from __future__ import annotations

from pathlib import Path

from ..models import autocast, load_model, load_tokenizer, resolve_model_path
from ..rewards import load_reward, process_device
from ..training.reference import Reference
from .config import ExperimentConfig
from .fingerprints import code_fingerprint, folder_fingerprint, reward_fingerprint
from .stages import read_stage, run_stage


class Context:
    """One experiment's shared resources. The base model (π_ref, the starting model) is loaded on first use."""

    def __init__(self, cfg: ExperimentConfig, log=print):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.log = log
        self.model_path = resolve_model_path(cfg.model, log)
        self.tokenizer = load_tokenizer(self.model_path)
        self.model_id = folder_fingerprint(self.model_path)
        # loaded now: a missing module, function or reward-model folder is an error before any sampling
        self.reward = load_reward(cfg.reward)
        self.reward_id = reward_fingerprint(cfg.reward)
        self.device = process_device()
        self.mixed_precision = cfg.train.get("mixed_precision", "no")
        self._base = None

    @property
    def base(self):
        if self._base is None:
            self._base = load_model(self.model_path, dtype=self.cfg.dtype).to(self.device).eval()
        return self._base

    @property
    def reference(self) -> Reference:
        """π_ref for the evaluations' KL: the base model itself (never trained here)."""
        return Reference(self.base, "initial")

    def compute(self):
        """The autocast context every forward pass of the experiment runs in (training's policy)."""
        return autocast(self.mixed_precision, self.device)

    def read(self, name: str) -> dict:
        """stage.json of a stage; nested names (``train/dpo-beta0.1``) live in sub-folders."""
        path = self.root / name
        return read_stage(path.parent, path.name)

    def fp(self, name: str) -> str:
        """A finished stage's fingerprint (what the stages reading it put in their inputs)."""
        return self.read(name)["fingerprint"]

    def stage(self, name: str, inputs: dict, fn, *, resumable: bool = False) -> Path:
        """Run stage ``name`` (:func:`.stages.run_stage`) unless it is cached with these inputs."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        inputs = {**inputs, "code": code_fingerprint()}
        out, _ = run_stage(path.parent, path.name, inputs, fn, log=self.log, resumable=resumable)
        return out

    def prompts(self, split: str) -> list[str]:
        """The prompts stage's ``train``, ``validation`` or ``heldout`` prompts."""
        return (self.root / "prompts" / f"{split}.txt").read_text().splitlines()
