"""Training: the shared optimizer-step loop, the offline families, checkpoints, and the run driver."""

from .run import Prepared, RunDirError, prepare, train, validate

__all__ = ["Prepared", "RunDirError", "prepare", "train", "validate"]
