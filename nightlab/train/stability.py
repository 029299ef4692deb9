"""What a sampler records for StableReinforce, and how a training datum's provenance finds it again.

A sampling request made with `record_stability_info` keeps, for each sequence it returns (by `sequence_id`):
the prompt, the sampled tokens, the sampler model's logprob of each (temperature 1, what the response
carries) and the log-probability each token was actually drawn with (after temperature, top-k and top-p;
what no response carries). A `stable_reinforce` datum names, through its provenance spans, the recorded
sequence behind each of its positions; the service checks that the datum's tokens are the recorded ones and
hands the loss the recorded numbers in place of anything the client sent.

Records belong to the session that sampled them, are kept a day after their last use in training (Tinker's
rule), go when their session ends, and past `MAX_RECORDED_TOKENS` the least recently used go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from nightlab.train.errors import UserError
from nightlab.train.records import Datum
from nightlab.train.sampling import SampledSequence

SEQUENCE_TTL_S = 24 * 3600.0
MAX_RECORDED_TOKENS = 50_000_000  # prompt + sampled tokens over all records (about 13 bytes each)
# the loss inputs the service fills from the records; whatever the client sent under these names is replaced
FILLED_INPUTS = ("logprobs", "sampling_logprobs", "sampled_mask")


@dataclass(frozen=True)
class Span:
    """A run of `length` datum positions that are positions [offset, offset + length) of a recorded
    sequence's sampled tokens (`sampled`) or of its request's prompt."""

    sampled: bool
    sequence_id: str
    offset: int
    length: int


@dataclass(frozen=True)
class Provenance:
    """A datum's provenance: spans tiling its input tokens, and spans tiling its target tokens."""

    model_input: list[Span]
    targets: list[Span]


@dataclass
class _Record:
    session_id: str
    prompt: np.ndarray  # int32, shared by the samples of one request
    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32: the sampler model's, temperature 1
    sampling_logprobs: np.ndarray  # float32: the distribution each token was drawn from
    used_at: float

    @property
    def size(self) -> int:
        return len(self.prompt) + len(self.tokens)


class StabilityStore:
    """Recorded sequences by sequence_id, in least-recently-used order."""

    def __init__(
        self,
        ttl_s: float = SEQUENCE_TTL_S,
        max_tokens: int = MAX_RECORDED_TOKENS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_tokens = max_tokens
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._records)

    def record(
        self, session_id: str, prompt: list[int], sequences: list[tuple[str, SampledSequence]]
    ) -> None:
        """Keep what StableReinforce needs of each (sequence_id, sequence) sampled from `prompt`."""
        shared = np.asarray(prompt, np.int32)
        for sequence_id, seq in sequences:
            self._forget(sequence_id)
            record = _Record(
                session_id,
                shared,
                np.asarray(seq.tokens, np.int32),
                np.asarray(seq.logprobs, np.float32),
                np.asarray(seq.sampling_logprobs, np.float32),
                self._clock(),
            )
            self._records[sequence_id] = record
            self._tokens += record.size
        while self._tokens > self.max_tokens and self._records:
            self._forget(next(iter(self._records)))

    def expire(self) -> int:
        """Forget the records unused for `ttl_s`; return how many went."""
        cutoff = self._clock() - self.ttl_s
        old = [sid for sid, record in self._records.items() if record.used_at < cutoff]
        for sequence_id in old:
            self._forget(sequence_id)
        return len(old)

    def drop_session(self, session_id: str) -> None:
        for sequence_id in [sid for sid, r in self._records.items() if r.session_id == session_id]:
            self._forget(sequence_id)

    def _forget(self, sequence_id: str) -> None:
        record = self._records.pop(sequence_id, None)
        if record is not None:
            self._tokens -= record.size

    def _lookup(self, sequence_id: str, session_id: str, where: str) -> _Record:
        record = self._records.get(sequence_id)
        if record is None:
            raise UserError(
                f"{where}: no recorded sequence {sequence_id!r}; sample with record_stability_info=True "
                f"(recorded sequences are kept {self.ttl_s / 3600:.0f} h after their last use, until their "
                "session ends)"
            )
        if record.session_id != session_id:
            raise UserError(
                f"{where}: sequence {sequence_id!r} was sampled in another session; provenance works only "
                "within one session"
            )
        return record

    def resolve(self, session_id: str, data: list[Datum], provenance: list[Provenance | None]) -> list[Datum]:
        """The datums with their loss inputs filled from the records their provenance names, after checking
        that each datum's tokens are the recorded ones; raise UserError naming the datum otherwise."""
        used: dict[str, _Record] = {}
        pairs = enumerate(zip(data, provenance, strict=True))
        resolved = [self._resolve(i, datum, spans, session_id, used) for i, (datum, spans) in pairs]
        now = self._clock()
        for sequence_id, record in used.items():  # a training request that uses a sequence restarts its day
            record.used_at = now
            self._records.move_to_end(sequence_id)
        return resolved

    def _resolve(
        self, i: int, datum: Datum, provenance: Provenance | None, session_id: str, used: dict[str, _Record]
    ) -> Datum:
        where = f"datum {i}"
        if provenance is None:
            raise UserError(
                f"{where} has no provenance: stable_reinforce needs every datum annotated with "
                "Datum.with_provenance, naming sequences sampled with record_stability_info=True in this "
                "session"
            )
        if datum.images:
            raise UserError(f"{where}: stable_reinforce takes datums of tokens only here, not images")
        targets = np.asarray(datum.loss_fn_inputs.get("target_tokens", np.zeros(0)))
        if targets.shape != (len(datum.tokens),):
            raise UserError(f"{where}: stable_reinforce needs target_tokens of shape ({len(datum.tokens)},)")
        advantages = datum.loss_fn_inputs.get("advantages")
        tokens = np.asarray(datum.tokens, np.int64)

        def lookup(sequence_id: str) -> _Record:
            used[sequence_id] = self._lookup(sequence_id, session_id, where)
            return used[sequence_id]

        for at, span, source in _runs(provenance.model_input, len(tokens), lookup, f"{where} model_input"):
            _check_same(tokens[at : at + span.length], source, f"{where} input tokens at {at}", span)
        size = len(tokens)
        filled = {
            "logprobs": np.zeros(size, np.float32),
            "sampling_logprobs": np.zeros(size, np.float32),
            "sampled_mask": np.zeros(size, np.float32),
        }
        for at, span, source in _runs(provenance.targets, size, lookup, f"{where} loss_fn_inputs"):
            run = slice(at, at + span.length)
            _check_same(targets[run], source, f"{where} target tokens at {at}", span)
            if span.sampled:
                record = used[span.sequence_id]
                recorded = slice(span.offset, span.offset + span.length)
                filled["logprobs"][run] = record.logprobs[recorded]
                filled["sampling_logprobs"][run] = record.sampling_logprobs[recorded]
                filled["sampled_mask"][run] = 1.0
            elif advantages is not None and np.any(np.asarray(advantages)[run] != 0):
                raise UserError(
                    f"{where}: nonzero advantages at positions {at}..{at + span.length - 1}, which are "
                    f"prompt tokens of {span.sequence_id!r}; stable_reinforce trains only on sampled tokens"
                )
        return Datum(datum.tokens, {**datum.loss_fn_inputs, **filled}, datum.images)


def _runs(
    spans: list[Span], size: int, lookup: Callable[[str], _Record], where: str
) -> Iterator[tuple[int, Span, np.ndarray]]:
    """(datum position, span, the recorded tokens it claims) for spans that must tile `size` positions."""
    total = sum(span.length for span in spans)
    if total != size:
        raise UserError(f"{where} provenance spans cover {total} positions; the field has {size}")
    at = 0
    for span in spans:
        record = lookup(span.sequence_id)
        source = record.tokens if span.sampled else record.prompt
        if span.offset + span.length > len(source):
            kind = "sampled tokens" if span.sampled else "prompt"
            raise UserError(
                f"{where}: span [{span.offset}, {span.offset + span.length}) of {span.sequence_id!r} runs "
                f"past its {kind} ({len(source)} tokens)"
            )
        yield at, span, source[span.offset : span.offset + span.length]
        at += span.length


def _check_same(given: np.ndarray, recorded: np.ndarray, where: str, span: Span) -> None:
    if not np.array_equal(given, recorded):
        kind = "sampled tokens" if span.sampled else "prompt"
        raise UserError(
            f"{where}: the tokens differ from {span.sequence_id!r}'s {kind} at [{span.offset}, "
            f"{span.offset + span.length}); provenance must name the tokens exactly as sampled"
        )
