"""What identifies a stage's inputs by content, so a cached stage is reused only when nothing it depends on
changed: files (hashed whole when small; size, mtime_ns and a hash of the first and last MiB when large),
model folders (every file: weights, config, tokenizer, chat template), reward functions (the source file of a
``module:function``, the package version of VADER, the folder of a reward model) and the code versions.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect

from ..files import file_fingerprint, folder_fingerprint


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def reward_fingerprint(spec: str) -> dict:
    """A reward spec by what it computes: VADER's package version, a reward model's folder, or the source
    file of a ``module:function`` (so editing the function reruns what depends on its scores; a helper it
    imports from another module is not followed)."""
    from .. import __version__
    from ..rewards import BUILTIN, REWARD_MODEL_PREFIX

    spec = spec.strip()
    if spec == "vader":
        return {"spec": spec, "vaderSentiment": _version("vaderSentiment")}
    if spec in BUILTIN:
        return {"spec": spec, "preftune": __version__}
    if spec.startswith(REWARD_MODEL_PREFIX):
        return {"spec": spec, "weights": folder_fingerprint(spec[len(REWARD_MODEL_PREFIX) :])}
    module = importlib.import_module(spec.partition(":")[0])
    try:
        source = inspect.getsourcefile(module)
    except TypeError:  # a built-in module
        source = None
    content = file_fingerprint(source) if source else {"version": getattr(module, "__version__", None)}
    return {"spec": spec, "module_file": content}


def code_fingerprint() -> dict:
    """The versions of the code every stage runs (a new preftune may sample, train or score differently)."""
    from .. import __version__

    return {"preftune": __version__}
