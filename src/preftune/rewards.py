"""Reward functions, shared by the experiment and online training: one signature, checked results.

A reward function is called as ``f(prompts, completions, completion_ids, **columns)`` and returns one
``float`` or ``None`` per completion:

- ``prompts``: the prompts, one per completion (a text, or a list of messages);
- ``completions``: the decoded completions (special tokens skipped);
- ``completion_ids``: the sampled token ids of each completion (with the EOS, if one was generated);
- ``**columns``: the prompt data set's other columns, one value per completion (``answer=[...]``).

A function receives only the arguments it names (or all of them with ``**kwargs``), so
``def score(prompts, completions)`` is a valid reward. ``None`` means "no reward for this completion": it
is left out of its group's statistics (online training) and needs another function to score it when
several are combined. A function that raises, returns the wrong number of values, or a non-finite value
stops with an error naming it.

Built-in functions (config ``{name: ..., weight: ..., options}`` or a plain name string):

==========================  =====================================================================
``vader``                   sentiment of the completion, r = 1 + VADER compound (below), in (0, 2)
``length`` (``target``)     −|n − target| / target for a completion of n tokens: 0 at the target
``regex`` (``pattern``,     1.0 if the pattern is found in the completion (``mode: search``) or
``mode``)                   matches all of it (``mode: fullmatch``), else 0.0
``exact_match``             1.0 if the completion equals the row's ``column`` (default ``answer``),
(``column``, ``normalize``)  after stripping and case-folding when ``normalize`` (default true);
                            ``None`` where the row has no value
``reward_model:PATH``       a preftune-trained reward model (one-output classifier), scoring
                            ``prompt + completion``; safetensors only, no remote code
``package.module:function`` any importable callable with the signature above
==========================  =====================================================================

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

"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

REWARD_MODEL_PREFIX = "reward_model:"
COMPOUND_CLIP = 0.9999  # one step of VADER's 4-decimal rounding inside +-1


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it."""


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _check_lengths(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} responses; they must pair up")


def vader_reward(prompts: list, completions: list[str]) -> list[float]:
    """r = 1 + clip(VADER compound(completion), +-0.9999), in (0, 2); see the module docstring.

    ``prompts`` is accepted for the common signature and only checked for length.
    """
    _check_lengths(prompts, completions)
    analyzer = _analyzer()
    scores = []
    for text in completions:
        compound = float(analyzer.polarity_scores(text)["compound"])  # rounded to 4 decimals
        scores.append(1.0 + min(max(compound, -COMPOUND_CLIP), COMPOUND_CLIP))
    return scores


def length_reward(target: int) -> Callable:
    """−|n − target| / target for a completion of n tokens."""
    if not target >= 1:
        raise ValueError(f"length reward: target must be >= 1 token, got {target}")

    def length(prompts, completions, completion_ids):
        return [-abs(len(ids) - target) / target for ids in completion_ids]

    return length


def regex_reward(pattern: str, mode: str = "search") -> Callable:
    """1.0 if ``pattern`` is found in (``search``) or matches all of (``fullmatch``) the completion."""
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"regex reward: mode must be search or fullmatch, got {mode!r}")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"regex reward: bad pattern {pattern!r}: {err}") from None
    match = compiled.search if mode == "search" else compiled.fullmatch

    def regex(prompts, completions):
        return [1.0 if match(text) else 0.0 for text in completions]

    return regex


def exact_match_reward(column: str = "answer", normalize: bool = True) -> Callable:
    """1.0 if the completion equals the row's ``column`` (None where the row has no value)."""

    def norm(text: str) -> str:
        return text.strip().casefold() if normalize else text

    def exact_match(prompts, completions, **columns):
        if column not in columns:
            raise ValueError(f"exact_match reward: the prompt data has no column {column!r}")
        return [
            None if ref is None else float(norm(text) == norm(str(ref)))
            for text, ref in zip(completions, columns[column])
        ]

    return exact_match


BUILTIN: dict[str, Callable[..., Callable]] = {
    "vader": lambda: vader_reward,
    "length": length_reward,
    "regex": regex_reward,
    "exact_match": exact_match_reward,
}


class RewardModelScorer:
    """Scores ``prompt + completion`` with a local sequence-classification model (one logit); a
    conversational prompt is rendered with the reward model's chat template first.

    The model is loaded through :func:`preftune.models.load_model` (safetensors only,
    ``trust_remote_code=False``), put in eval mode and run without gradients. Texts are
    right-padded (the classification head reads the last non-pad token); a tokenizer
    without a pad token uses its EOS token. Texts longer than ``max_length`` tokens are
    truncated from the right.

    The model is loaded on the CPU and moved on the first call, to ``device`` when given, else to the
    calling process's device (accelerate's, once a run has set it up; the GPU when there is one otherwise):
    a scorer built while a config is checked, before the accelerator exists, still lands on each process's
    own GPU under several processes, not every rank on ``cuda:0``.
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

        from .models import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = Path(path)
        if not path.exists():
            raise ValueError(f"reward model folder not found: {path}")
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self._device = torch.device(device) if device else None
        self.device: torch.device | None = None  # set on the first call (see the class docstring)

        num_labels = AutoConfig.from_pretrained(path).num_labels
        if num_labels != 1:
            raise ValueError(f"reward model at {path} has num_labels={num_labels}; a scalar reward needs 1")
        # the one model-loading path: safetensors only, no remote code, pad = EOS when the tokenizer has none
        self.tokenizer = load_tokenizer(str(path))
        self.tokenizer.padding_side = "right"
        model = load_model(str(path), sequence_classification=True, pad_token_id=self.tokenizer.pad_token_id)
        self.model = model.eval()

    def _place(self):
        if self.device is None:
            self.device = self._device or process_device()
            self.model.to(self.device)
        return self.device

    def _text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        import torch

        _check_lengths(prompts, completions)
        texts = [self._text(p) + r for p, r in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self._place())
                logits = self.model(**enc).logits  # (B, 1)
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def process_device():
    """This process's device: accelerate's once a run (or anything else) has set its state up — under
    several processes each one's own GPU — else :func:`preftune.models.default_device`."""
    from accelerate.state import PartialState

    from .models import default_device

    if PartialState._shared_state:  # set up: read it, never initialise it from here
        return PartialState().device
    return default_device()


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"reward spec {spec!r}: expected a built-in ({', '.join(BUILTIN)}), 'reward_model:PATH' or "
            "'module:function'"
        )
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


def _accepted(fn: Callable) -> tuple[set[str], bool]:
    """The keyword arguments ``fn`` names, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


@dataclass
class RewardFunction:
    """A named, weighted reward function with checked output (one finite float or None per completion)."""

    name: str
    fn: Callable
    weight: float = 1.0
    _names: set[str] = field(default_factory=set, repr=False)
    _any: bool = field(default=False, repr=False)

    def __post_init__(self):
        self._names, self._any = _accepted(self.fn)

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        _check_lengths(prompts, completions)
        extra = {"completion_ids": completion_ids, **columns}
        kwargs = {k: v for k, v in extra.items() if v is not None and (self._any or k in self._names)}
        try:
            raw = self.fn(prompts, completions, **kwargs)
        except Exception as err:
            raise RewardError(f"reward {self.name!r} raised {type(err).__name__}: {err}") from err
        try:
            values = [None if v is None else float(v) for v in raw]
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward {self.name!r} returned values that are not numbers: {err}") from err
        if len(values) != len(completions):
            raise RewardError(
                f"reward {self.name!r} returned {len(values)} scores for {len(completions)} responses"
            )
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                raise RewardError(f"reward {self.name!r} returned a non-finite score {v} at index {i}")
        return values


def load_reward(spec: str | dict) -> RewardFunction:
    """A :class:`RewardFunction` from a spec: a name string (``"vader"``, ``"reward_model:PATH"``,
    ``"package.module:function"``) or a mapping ``{name: ..., weight: 1.0, <options>}`` (options of the
    built-ins: ``length.target``, ``regex.pattern``/``mode``, ``exact_match.column``/``normalize``;
    ``reward_model.batch_size``). Errors (unknown name, missing module or function, bad options) are
    raised here, before any sampling."""
    options = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = options.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"reward {spec!r}: needs a 'name' (a built-in, 'reward_model:PATH' or 'module:function')"
        )
    name = name.strip()
    weight = options.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
    if name in BUILTIN:
        try:
            fn = BUILTIN[name](**options)
        except TypeError as err:
            raise ValueError(f"reward {name!r}: bad options {options}: {err}") from None
    elif name.startswith(REWARD_MODEL_PREFIX):
        path = name[len(REWARD_MODEL_PREFIX) :]
        if not path:
            raise ValueError(f"reward spec {name!r}: missing PATH after 'reward_model:'")
        fn = RewardModelScorer(path, **options)
    elif ":" in name:
        if options:
            raise ValueError(f"reward {name!r}: a module:function takes no options (got {sorted(options)})")
        fn = _import_callable(name)
    else:
        raise ValueError(
            f"unknown reward spec {name!r}; expected a built-in ({', '.join(BUILTIN)}), 'reward_model:PATH' "
            "or 'module:function'"
        )
    return RewardFunction(name, fn, float(weight))


def score_all(
    functions: Sequence[RewardFunction], prompts, completions, completion_ids, columns: dict
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Every function's rewards and their weighted sum per completion: Σ_k w_k r_k over the functions
    that gave a value; ``None`` when none did. The per-function rewards are keyed by :func:`reward_keys`."""
    values = [f(prompts, completions, completion_ids, **columns) for f in functions]
    totals: list[float | None] = []
    for i in range(len(completions)):
        given = [f.weight * v[i] for f, v in zip(functions, values) if v[i] is not None]
        totals.append(sum(given) if given else None)
    return totals, dict(zip(reward_keys(functions), values))


def reward_keys(functions: Sequence[RewardFunction]) -> list[str]:
    """One metric key per function: its name, and ``name#k`` for the k-th function of a name used more than
    once (two ``regex`` rewards with different patterns are ``regex`` and ``regex#2``)."""
    seen: dict[str, int] = {}
    keys = []
    for f in functions:
        seen[f.name] = seen.get(f.name, 0) + 1
        keys.append(f.name if seen[f.name] == 1 else f"{f.name}#{seen[f.name]}")
    return keys
