"""Reward functions: ``reward(prompts, responses) -> scores``, shared by the experiment and online training.

The sentiment reward
--------------------
The ODPO paper (Amini et al. 2024, arXiv 2402.10571, section 4) scores a review with a
sentiment classifier and maps it to a positive number::

    r = 1 + p(positive)   if the classifier says positive
    r = 1 - p(negative)   if it says negative

so r lies in (0, 2), r > 1 means positive and r < 1 negative, and log r (used by ODPO's
``log s_w - log s_l`` offset) is always defined. No classifier can be downloaded here,
so we use VADER (Hutto & Gilbert 2014, the ``vaderSentiment`` package), a lexicon and
rule-based scorer, and map its *compound* score c in (-1, 1) the same way::

    r = 1 + c

VADER's compound is the normalised sum of word valences, c = x / sqrt(x^2 + 15), which
approaches but never reaches +-1. VADER then rounds c to 4 decimals, so a long run of
strong words (valence sum |x| >= ~390, e.g. "great " * 200) *does* give c = +-1.0; we
clip c to [-0.9999, 0.9999] (one rounding step inside) so that r stays strictly inside
(0, 2) and log r is finite: r in [0.0001, 1.9999]. Text without sentiment words
(including the empty string) has c = 0 exactly, so r = 1.0 exactly.
Like the ODPO mapping, r is monotone in "how positive" the text is; unlike it, c is a
lexicon score, not a probability, so the scale differs (a mildly positive sentence gets
c around 0.3-0.6). Only the *response* is scored: the prompt's own words (review
openings can contain genre words such as "horror" that VADER counts as negative) would
add the same constant to every response of a prompt.

Other rewards
-------------
:func:`load_reward` turns a spec string into a reward function:

- ``"vader"``: :func:`vader_reward`;
- ``"reward_model:PATH"``: a sequence-classification model with one output, loaded from
  a local folder (:class:`RewardModelScorer`), scoring ``prompt + response``;
- ``"package.module:function"``: any importable callable with the same signature.

Every function it returns validates the result: one finite float per response.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

RewardFn = Callable[[list[str], list[str]], list[float]]

REWARD_MODEL_PREFIX = "reward_model:"
COMPOUND_CLIP = 0.9999  # one step of VADER's 4-decimal rounding inside +-1


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _check_lengths(prompts: list[str], responses: list[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")


def vader_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """r = 1 + clip(VADER compound(response), +-0.9999), in (0, 2); see the module docstring.

    ``prompts`` is accepted for the common signature and only checked for length.
    """
    _check_lengths(prompts, responses)
    analyzer = _analyzer()
    scores = []
    for text in responses:
        compound = float(analyzer.polarity_scores(text)["compound"])  # rounded to 4 decimals
        scores.append(1.0 + min(max(compound, -COMPOUND_CLIP), COMPOUND_CLIP))
    return scores


class RewardModelScorer:
    """Scores ``prompt + response`` with a local sequence-classification model (one logit).

    The model is loaded through :func:`preftune.models.load_model` (safetensors only,
    ``trust_remote_code=False``), put in eval mode and run without gradients. Texts are
    right-padded (the classification head reads the last non-pad token); a tokenizer
    without a pad token uses its EOS token. Texts longer than ``max_length`` tokens are
    truncated from the right.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 16,
        *,
        device: str | None = None,
        max_length: int = 1024,
    ):
        import torch
        from transformers import AutoConfig

        from .models import default_device, load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(path)
        if not path.exists():
            raise ValueError(f"reward model folder not found: {path}")
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device else default_device()

        num_labels = AutoConfig.from_pretrained(path).num_labels
        if num_labels != 1:
            raise ValueError(f"reward model at {path} has num_labels={num_labels}; a scalar reward needs 1")
        # the one model-loading path: safetensors only, no remote code, pad = EOS when the tokenizer has none
        self.tokenizer = load_tokenizer(str(path))
        self.tokenizer.padding_side = "right"
        model = load_model(str(path), sequence_classification=True, pad_token_id=self.tokenizer.pad_token_id)
        self.model = model.to(self.device).eval()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        _check_lengths(prompts, responses)
        texts = [p + r for p, r in zip(prompts, responses)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**enc).logits  # (B, 1)
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r}: expected 'vader', 'reward_model:PATH' or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not callable")
    return obj


def _validated(fn: Callable, spec: str) -> RewardFn:
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        raw = fn(prompts, responses)
        try:
            values = [float(v) for v in raw]
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward {spec!r} returned values that are not numbers: {err}") from err
        if len(values) != len(responses):
            raise ValueError(f"reward {spec!r} returned {len(values)} scores for {len(responses)} responses")
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise ValueError(f"reward {spec!r} returned a non-finite score {v} at index {i}")
        return values

    reward.__name__ = f"reward[{spec}]"
    reward.__doc__ = f"Reward {spec!r} with checked output (one finite float per response)."
    return reward


def load_reward(spec: str) -> RewardFn:
    """Turn a reward spec into ``fn(prompts, responses) -> list[float]``.

    Specs: ``"vader"``; ``"reward_model:PATH"`` (a local folder, see
    :class:`RewardModelScorer`); ``"module:function"`` (``function`` may be a dotted
    attribute path). The ``reward_model:`` prefix is checked first. The returned function
    raises ``ValueError`` naming the spec when the scores do not match the responses in
    number or are not finite (naming the first bad index).
    """
    spec = spec.strip()
    if spec == "vader":
        fn: Callable = vader_reward
    elif spec.startswith(REWARD_MODEL_PREFIX):
        path = spec[len(REWARD_MODEL_PREFIX) :]
        if not path:
            raise ValueError(f"reward spec {spec!r}: missing PATH after 'reward_model:'")
        fn = RewardModelScorer(path, batch_size=16)
    elif ":" in spec:
        fn = _import_callable(spec)
    else:
        raise ValueError(
            f"unknown reward spec {spec!r}; expected 'vader', 'reward_model:PATH' or 'module:function'"
        )
    return _validated(fn, spec)
