"""Streamed training data (``data.streaming: true``): records read, validated and tokenised as they are
consumed, never all held; and the one bounded pass of ``preftune validate``.

The stream of a run is an endless sequence of *passes* over the source. Pass p reads the source's rows in
order (:func:`preftune.data.load.iter_rows`) through a shuffle buffer of ``data.shuffle_buffer`` rows seeded
with ``seed + p`` (:func:`shuffled`; a buffer of 1 keeps the file's order). Each row is checked and tokenised
when it leaves the buffer; a kept example gets the next *global index* 0, 1, 2, ... (a dropped pair, see
:mod:`preftune.data.tokenize`, gets none). :class:`ExampleStream` holds only a window of examples,
addressed by global index, and the *position* after each one: (pass, rows of that pass taken from the
buffer). Replaying the stream from a position (re-reading the source, the same buffer RNG, the rows before
it skipped unchecked and untokenised) gives the same examples from there on: that is how ``--resume``
continues at the exact record.

:class:`StreamPlan` is the training loop's plan over the stream (:func:`preftune.training.loop.fit`'s
``plan``): optimizer step s takes the global indices ``[s·G, (s+1)·G)``, G = batch_size × processes ×
grad_accum, in ``grad_accum`` micro-batches of ``batch_size × processes``, rank r taking every
processes-th, as :class:`~preftune.training.loop.StepPlan` with the file order for its permutation. Every
process reads and tokenises the whole stream (so all agree on the indices and meet a bad record together).
Its checkpoint state is the stream position at the step's boundary.

The online methods stream their prompts the same way (:func:`record_stream`, :class:`PromptProcessor`):
:class:`PromptStreamPlan` gives sampling batch b the prompts ``[b·P, (b+1)·P)``, each serving the method's
updates per batch of samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from preftune.data.checks import MAX_SHOWN, problems_message, row_problems
from preftune.data.load import iter_rows
from preftune.data.prompts import PromptExample, PromptStats, prompt_row_problems, tokenize_prompt
from preftune.data.tokenize import MAX_NAMED_DROPS, TokenizeStats, _tokenize
from preftune.data.types import DataError, PairExample
from preftune.data.unpaired import tokenize_unpaired_row, unpaired_row_problems


def shuffled(rows: Iterable, buffer: int, rng: random.Random) -> Iterator:
    """``rows`` in a buffered random order (as HF datasets' ``IterableDataset.shuffle``): fill a buffer of
    ``buffer`` items; then each new item takes the place of one drawn uniformly from the buffer, which is
    emitted; at the end the rest of the buffer is emitted in a random order. ``buffer == 1``: the order of
    ``rows``. Holds at most ``buffer`` items."""
    if buffer < 1:
        raise ValueError(f"the shuffle buffer must hold at least 1 item, got {buffer}")
    held: list = []
    for item in rows:
        if len(held) < buffer:
            held.append(item)
            continue
        k = rng.randrange(buffer)
        yield held[k]
        held[k] = item
    rng.shuffle(held)
    yield from held


@dataclass
class Scan:
    """What one bounded pass over a source found: rows read, problems counted, the first ``MAX_SHOWN``."""

    rows: int = 0
    problems: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, problems: list[str]) -> None:
        self.problems += len(problems)
        self.shown.extend(problems[: max(0, MAX_SHOWN - len(self.shown))])

    def message(self) -> str:
        """:func:`preftune.data.checks.validate_rows`' message: the count, the first problems, the rest's count."""
        return problems_message(self.shown, self.problems, self.rows)


def scan_pairs(
    spec: str, *, columns: dict | None = None, split: str = "train", require_scores: bool = False,
    require_margin: bool | None = False,
) -> Scan:  # fmt: skip
    """Read every row of a pair source once, with bounded memory, and check it as training would; unreadable
    records (malformed JSON, ...) count as problems too. ``require_margin=None``: every row needs a margin
    when the first one has one (the streamed rule). Raises nothing for record problems: see ``Scan``."""
    scan = Scan()
    for row in iter_rows(spec, columns=columns, split=split, on_error=lambda p: scan.add([p])):
        if require_margin is None:
            require_margin = row.get("margin") is not None
        scan.add(row_problems(row, scan.rows, require_scores=require_scores, require_margin=require_margin))
        scan.rows += 1
    return scan


class PairProcessor:
    """A streamed row -> its :class:`PairExample` (or ``None`` when tokenisation drops it): the checks of
    :func:`~preftune.data.checks.validate_rows` (a bad row raises :class:`DataError` naming its file and
    line), tokenisation as :func:`~preftune.data.tokenize.tokenize_rows`, then ``check(example)`` (token ids in
    the vocabulary, ODPO's score domain...). ``stats`` counts as :class:`TokenizeStats` does; the first
    :data:`MAX_NAMED_DROPS` drops are logged."""

    def __init__(
        self, tokenizer, *, max_length: int, max_prompt_length: int, require_scores: bool = False,
        require_margin: bool | None = None, check: Callable[[PairExample], None] | None = None, log=print,
    ) -> None:  # fmt: skip
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.require_scores, self.require_margin = require_scores, require_margin
        self.check, self.log = check, log
        self.stats = TokenizeStats()

    def __call__(self, row: dict, index: int) -> PairExample | None:
        if self.require_margin is None:  # all rows or none, decided by the first
            self.require_margin = row.get("margin") is not None
        problems = row_problems(
            row, index, require_scores=self.require_scores, require_margin=self.require_margin
        )
        _refuse(problems)
        out = _tokenize(
            row, self.tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
            index=index,
        )  # fmt: skip
        stats = self.stats
        stats.total += 1
        stats.prompt_truncated += out.prompt_truncated
        stats.response_truncated += out.response_truncated
        if out.dropped:
            stats.dropped_empty += out.dropped == "empty"
            stats.dropped_identical += out.dropped == "identical"
            if len(stats.dropped) < MAX_NAMED_DROPS:
                why = {"empty": "a response has no token besides its EOS", "identical": "chosen == rejected"}
                stats.dropped.append(f"{row['_source']}: dropped, {why[out.dropped]}")
                self.log(f"train data (streamed): {stats.dropped[-1]}")
            return None
        stats.kept += 1
        if self.check is not None:
            self.check(out.example)
        return out.example


def _refuse(problems: list[str], what: str = "train data") -> None:
    """A streamed record's problems, if any, as the :class:`DataError` that stops training."""
    if problems:
        raise DataError(
            f"{what} (streamed): a bad record; training stops here (`preftune validate` lists every bad "
            "record of the file):\n" + "\n".join(f"  {p}" for p in problems)
        )


class UnpairedProcessor:
    """A streamed unpaired row (KTO: ``prompt``, ``completion``, ``label``) -> its
    :class:`~preftune.data.unpaired.UnpairedExample` (or ``None``: dropped), with the checks and tokenisation
    of the whole-file path (:func:`~preftune.data.unpaired.unpaired_row_problems`,
    :func:`~preftune.data.unpaired.tokenize_unpaired_row`), then ``check(example)``."""

    def __init__(
        self, tokenizer, *, max_length: int, max_prompt_length: int, check: Callable | None = None, log=print
    ) -> None:
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.check, self.log = check, log
        self.stats = TokenizeStats()

    def __call__(self, row: dict, index: int):
        _refuse(unpaired_row_problems(row, index))
        named = len(self.stats.dropped)
        example = tokenize_unpaired_row(
            row, self.tokenizer, index, self.stats, max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )  # fmt: skip
        if len(self.stats.dropped) > named:
            self.log(f"train data (streamed): {self.stats.dropped[-1]}")
        if example is not None and self.check is not None:
            self.check(example)
        return example


Position = tuple[int, int]  # (pass, rows of that pass taken from the shuffle buffer)


class ExampleStream:
    """Examples of an endless, replayable stream, addressed by global index, holding only a window.

    ``open_pass(p)``: the rows of pass p, in order (already shuffled); ``process(row, index)``: the example
    of a row with global index ``index`` or ``None`` (dropped). ``stream[i]`` reads on up to example i; an
    example before the window (see :meth:`evict_before`) is an error. A pass without a single kept example
    is a :class:`DataError` (an empty source, or every pair dropped)."""

    def __init__(self, open_pass: Callable[[int], Iterator[dict]], process: Callable[[dict, int], Any]):
        self.open_pass, self.process = open_pass, process
        self.window: dict[int, Any] = {}
        self.after: dict[int, Position] = {}  # global index -> the position right after its row
        self.pass_of: dict[int, int] = {}
        self.seek((0, 0), 0)

    def seek(self, position: Position, first_index: int) -> None:
        """Continue from ``position`` (the rows before it are skipped unread by ``process``); the next kept
        example gets global index ``first_index``."""
        self.position, self.start, self.first_index = tuple(position), tuple(position), first_index
        self.next_index = first_index
        self.window.clear(), self.after.clear(), self.pass_of.clear()
        self._rows: Iterator[dict] | None = None
        self._kept_in_pass = position[1] > 0  # this pass has given examples before the position

    def _next_row(self) -> dict:
        while True:
            if self._rows is None:
                pass_, skip = self.position
                self._rows = self.open_pass(pass_)
                for _ in range(skip):  # replayed, unchecked and untokenised
                    if next(self._rows, None) is None:
                        break
            row = next(self._rows, None)
            if row is not None:
                self.position = (self.position[0], self.position[1] + 1)
                return row
            if not self._kept_in_pass:
                raise DataError(
                    f"train data (streamed): pass {self.position[0] + 1} over the data gave no example (the "
                    "source is empty, or tokenisation dropped every pair)"
                )
            self.position, self._rows, self._kept_in_pass = (self.position[0] + 1, 0), None, False

    def fill(self, end: int) -> None:
        """Read on until the examples before global index ``end`` are known."""
        while self.next_index < end:
            row = self._next_row()
            example = self.process(row, self.next_index)
            if example is None:
                continue
            i = self.next_index
            self.window[i], self.after[i], self.pass_of[i] = example, self.position, self.position[0]
            self.next_index += 1
            self._kept_in_pass = True

    def position_before(self, index: int) -> Position:
        """The position from which example ``index`` is the next one: right after example ``index - 1``'s row
        (known for the window and the example just before it)."""
        if index == self.first_index:
            return self.start
        self.fill(index)
        return self.after[index - 1]

    def evict_before(self, index: int) -> None:
        """Forget the examples before ``index`` (the position after ``index - 1`` is kept)."""
        for i in [i for i in self.window if i < index]:
            del self.window[i], self.pass_of[i]
            if i < index - 1:
                del self.after[i]

    def __getitem__(self, index: int):
        self.fill(index + 1)
        if index not in self.window:
            raise IndexError(f"streamed example {index} has left the window (it is read once, in order)")
        return self.window[index]

    def map(self, fn: Callable[[Any], Any]) -> MappedStream:
        """A view whose items are ``fn(self[i])`` (computed when read)."""
        return MappedStream(self, fn)


class MappedStream:
    """``stream.map(fn)``: ``view[i] == fn(stream[i])``."""

    def __init__(self, stream: ExampleStream, fn: Callable[[Any], Any]):
        self.stream, self.fn = stream, fn

    def __getitem__(self, index: int):
        return self.fn(self.stream[index])


def record_stream(
    spec: str, processor: Callable[[dict, int], Any], *, columns: dict | None, split: str, buffer: int,
    seed: int, keep_all: bool = False,
) -> ExampleStream:  # fmt: skip
    """The :class:`ExampleStream` of a source (pairs, unpaired records, or prompts with ``keep_all``: every
    column kept for the reward functions): pass p is its rows through a shuffle buffer seeded with ``seed + p``."""

    def open_pass(p: int) -> Iterator[dict]:
        rows = iter_rows(spec, columns=columns, split=split, keep_all=keep_all)
        return shuffled(rows, buffer, random.Random(seed + p))

    return ExampleStream(open_pass, processor)


class StreamPlan:
    """The training plan over an :class:`ExampleStream`, with :class:`~preftune.training.loop.StepPlan`'s
    interface (``step``, ``step_examples``, ``steps_per_epoch``) and a checkpoint ``state``/``restore``.

    Step s covers global indices ``[s·G, (s+1)·G)`` (G = batch_size × world_size × grad_accum), in
    micro-batches of ``batch_size × world_size``, rank r taking every world_size-th; its "epoch" is the
    pass its first example came from. Every micro-batch is full (a stream has no last, short one). Before
    step s the examples of earlier steps leave the window."""

    steps_per_epoch = 1  # unused: a stream needs training.max_steps

    def __init__(
        self, stream: ExampleStream, batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
        log=print,
    ) -> None:  # fmt: skip
        self.stream, self.batch_size, self.grad_accum = stream, batch_size, grad_accum
        self.world_size, self.rank, self.log = world_size, rank, log
        self.per_step = batch_size * world_size * grad_accum
        self.boundaries: dict[int, Position] = {0: stream.position_before(0)}  # step -> its stream position

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        first, size = step * self.per_step, self.batch_size * self.world_size
        self.stream.evict_before(first)
        self.stream.fill(first + self.per_step)
        self.boundaries[step] = self.stream.position_before(first)
        self.boundaries[step + 1] = self.stream.position_before(first + self.per_step)
        for old in [s for s in self.boundaries if s < step]:
            del self.boundaries[old]
        micro = [
            list(range(start, start + size))[self.rank :: self.world_size]
            for start in range(first, first + self.per_step, size)
        ]
        return self.stream.pass_of[first], micro

    def step_examples(self, step: int) -> int:
        return self.per_step

    def state(self) -> dict:
        """The stream positions of the last step boundaries: a checkpoint of step s restores ``positions[s]``."""
        return {
            "stream": {
                "records_per_step": self.per_step,
                "positions": {str(s): list(p) for s, p in self.boundaries.items()},
            }
        }

    def restore(self, trainer_state: dict) -> None:
        """Continue after a checkpoint: the stream is replayed to the checkpoint step's position."""
        step = trainer_state["step"]
        saved = trainer_state.get("stream", {}).get("positions", {})
        if str(step) not in saved:
            raise ValueError(
                f"the checkpoint of step {step} has no stream position (written without data.streaming?); "
                "resume it with the data settings it was written with"
            )
        position = tuple(saved[str(step)])
        self.stream.seek(position, step * self.per_step)
        self.boundaries = {step: position}
        self.log(
            f"data.streaming: resuming at pass {position[0] + 1}, after its first {position[1]} records "
            "(re-read and skipped, not tokenised)"
        )


# --- prompt streams (online methods: grpo, ppo, online_dpo) ----------------------------------------------


def scan_prompts(spec: str, *, columns: dict | None = None, split: str = "train") -> Scan:
    """:func:`scan_pairs` for a prompt source (every column kept, for the reward functions): every row read
    once with bounded memory and checked as :func:`~preftune.data.prompts.validate_prompt_rows` checks it."""
    scan = Scan()
    for row in iter_rows(spec, columns=columns, split=split, keep_all=True, on_error=lambda p: scan.add([p])):
        scan.add(prompt_row_problems(row, scan.rows))
        scan.rows += 1
    return scan


class PromptProcessor:
    """A streamed prompt row -> its :class:`~preftune.data.prompts.PromptExample` (``index``: its global index):
    the checks of :func:`~preftune.data.prompts.validate_prompt_rows` (a bad row raises :class:`DataError`
    naming its file and line) and :func:`~preftune.data.prompts.tokenize_prompt`. A prompt is never dropped.
    ``stats`` counts the prompts tokenised and the truncated ones."""

    def __init__(self, tokenizer, *, max_prompt_length: int) -> None:
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.stats = PromptStats()

    def __call__(self, row: dict, index: int) -> PromptExample:
        _refuse(prompt_row_problems(row, index), "train prompts")
        example, truncated = tokenize_prompt(
            row, self.tokenizer, index, max_prompt_length=self.max_prompt_length
        )
        self.stats.total += 1
        self.stats.truncated += truncated
        return example


class PromptStreamPlan(StreamPlan):
    """The sampling batches of an online run over a prompt :class:`ExampleStream` (the whole-file plan's
    interface: ``step(batch)`` -> (pass, [this process's prompts])).

    Batch b takes the global indices ``[b·P, (b+1)·P)`` (P = ``prompts_per_batch``), process r every
    world_size-th of them, as the whole-file plan splits a batch; each batch serves ``updates_per_batch``
    optimizer steps. A checkpoint after optimizer step s keeps the position at the start of batch
    ``s // updates_per_batch``: the next batch, or the unfinished one whose rollout the checkpoint holds (its
    prompts are read again on resume, for the records named in messages). A pass with fewer than P prompts
    would put one prompt twice in a batch: refused at the first batch, as the whole-file plan refuses it."""

    def __init__(
        self, stream: ExampleStream, prompts_per_batch: int, updates_per_batch: int, world_size: int = 1,
        rank: int = 0, *, too_few: Callable[[int], None] | None = None, log=print,
    ) -> None:  # fmt: skip
        super().__init__(stream, prompts_per_batch // world_size, 1, world_size, rank, log)
        self.updates, self.too_few = updates_per_batch, too_few

    def step(self, batch: int) -> tuple[int, list[list[int]]]:
        out = super().step(batch)
        if batch == 0 and self.stream.pass_of[self.per_step - 1] > 0:  # pass 0 ended inside batch 0
            first_pass = sum(self.stream.pass_of[i] == 0 for i in range(self.per_step))
            if self.too_few is not None:
                self.too_few(first_pass)
            raise DataError(
                f"the prompt source has {first_pass} prompts, fewer than the {self.per_step} of a batch"
            )
        return out

    def state(self) -> dict:
        out = super().state()
        out["stream"]["updates_per_batch"] = self.updates
        return out

    def restore(self, trainer_state: dict) -> None:
        """Continue after the checkpoint of optimizer step s: the stream is replayed to batch
        ``s // updates_per_batch``'s start."""
        super().restore({**trainer_state, "step": trainer_state["step"] // self.updates})


__all__ = [
    "ExampleStream",
    "MappedStream",
    "PairProcessor",
    "PromptProcessor",
    "PromptStreamPlan",
    "Scan",
    "StreamPlan",
    "UnpairedProcessor",
    "record_stream",
    "scan_pairs",
    "scan_prompts",
    "shuffled",
]
