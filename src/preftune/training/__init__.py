"""Training: the shared engine (optimizer step, metrics, checkpoints), the offline loop and its families
(pairs, reward model), the reference model, and the run driver."""

from .prepare import Prepared, prepare
from .run import TRAINERS, train, validate
from .rundir import RunDirError

__all__ = ["Prepared", "RunDirError", "TRAINERS", "prepare", "train", "validate"]
