"""Batched generation for the training service: many requests x samples in one KV-cached decode loop.

Why a hand-written loop instead of `model.generate`: every sequence needs its own temperature / top-k / top-p
/ seed, logprobs of the sampled tokens under the raw model (temperature 1, what RL importance sampling
compares with the training forward), stop strings, and budget forcing that edits a sequence mid-flight. One
loop over `model(...)` with a shared `DynamicCache` does all of that while still running every active sequence
in one forward per step, which is where the speed of batching comes from.

Layout of the batch: prompts are left-padded to a common length; each row keeps a 2-D attention mask over all
cache columns and explicit position ids. Tokens that budget forcing takes back are masked out of the cache
(and positions continue from the number of visible tokens), so no cache surgery is needed; finished rows
leave the batch.

Stop rules follow Tinker: the returned tokens INCLUDE the stop sequence (the stop token id, or the tokens
whose decoded text completes a stop string), because tinker-cookbook renderers split the response on it and
count it. EOS stops a sequence unless `stop_at_eos` is False (Tinker's `stop=[]`).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from nightlab.train.errors import SamplingInputError
from nightlab.train.forward import causal_logits
from nightlab.train.records import ImageInput
from nightlab.train.vision import Pixels, Vision, model_inputs

MAX_BATCH_ROWS = 64  # sequences decoded together; larger request sets run in several batches


@dataclass
class BudgetForcing:
    """s1-style control of a reasoning model's thinking length.

    The generation is assumed to start inside the thinking section (the prompt opens it). If the model closes
    thinking (emits `end_thinking`, or a stop) before `min_thinking_tokens`, the closing text is taken back
    and `wait_text` appended instead; at `max_thinking_tokens` the delimiter and `answer_prefix` are forced.
    """

    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None
    end_thinking: str = "</think>"
    wait_text: str = "Wait"
    answer_prefix: str = ""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_at_eos: bool = True  # False = Tinker's `stop=[]`: run to max_tokens unless an explicit stop matches


@dataclass
class SampleRequest:
    prompt_tokens: list[int]
    params: SamplingParams
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    budget_forcing: BudgetForcing | None = None
    images: list[ImageInput] = field(default_factory=list)  # images between the prompt's tokens
    pixels: Pixels | None = None  # set by `with_images`, once the prompt holds the images' placeholders
    # called as on_token(sample_index, token) from the generating thread as each token is final, for
    # streaming; not called for budget-forced requests, whose recent tokens may still be taken back
    on_token: Callable[[int, int], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[list[tuple[int, float]]] | None = None  # per generated token when requested
    # log-probability of each token under the distribution it was drawn from (after temperature, top-k and
    # top-p; 0 for greedy and forced tokens): the behaviour policy StableReinforce weighs against
    sampling_logprobs: list[float] = field(default_factory=list)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # index 0 is None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


def generate(
    model,
    tokenizer,
    requests: list[SampleRequest],
    autocast: torch.dtype | None = None,
    vision: Vision | None = None,
) -> list[SampleResult]:
    """Batched generation over all requests (x num_samples) with the model as-is (adapter already active).

    `autocast` must be what training uses on this model, so that sampled and prompt logprobs are the ones the
    trainer computes; `vision` is how it takes images, if it does. All requests are validated before any
    work, so one bad request fails the call without partial results.
    """
    vocab = model.get_input_embeddings().num_embeddings
    max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    requests = [with_images(request, vision) for request in requests]
    for request in requests:
        validate(request, vocab, max_context)
    eos_ids = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            results: list[SampleResult] = []
            for chunk in _chunks(requests):
                results.extend(_generate_batch(model, autocast, tokenizer, chunk, eos_ids, vision))
            return results
    finally:
        model.train(was_training)


# --- validation ---------------------------------------------------------------------------------------------


def with_images(request: SampleRequest, vision: Vision | None) -> SampleRequest:
    """The request with its images' placeholders in the prompt and their pixels prepared; refuses images
    for a text-only model, and placeholder ids sent as text."""
    if vision is None:
        if request.images:
            raise SamplingInputError("this model takes no images; send a text-only prompt")
        return request
    tokens, pixels = vision.expand(request.prompt_tokens, request.images, "prompt")
    return replace(request, prompt_tokens=tokens, images=[], pixels=pixels)


def validate(request: SampleRequest, vocab: int, max_context: int | None) -> None:
    """Reject what would crash or silently misbehave deep inside the decode loop."""
    p = request.params
    if not request.prompt_tokens:
        raise SamplingInputError("prompt is empty: at least one token is needed to condition on")
    bad = [t for t in request.prompt_tokens if not 0 <= t < vocab]
    if bad:
        raise SamplingInputError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    bad = [t for t in p.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise SamplingInputError(f"stop token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    checks = [
        (p.max_tokens >= 0, f"max_tokens must be >= 0, got {p.max_tokens}"),
        (
            math.isfinite(p.temperature) and p.temperature >= 0,
            f"temperature must be >= 0, got {p.temperature}",
        ),
        (0 < p.top_p <= 1, f"top_p must be in (0, 1], got {p.top_p}"),
        (p.top_k == -1 or p.top_k >= 0, f"top_k must be -1 (off) or >= 0, got {p.top_k}"),
        (all(p.stop_strings), "stop strings must be non-empty"),
        (request.num_samples >= 1, f"num_samples must be >= 1, got {request.num_samples}"),
        (
            0 <= request.topk_prompt_logprobs <= vocab,
            f"topk_prompt_logprobs must be between 0 and the vocabulary size {vocab}, "
            f"got {request.topk_prompt_logprobs}",
        ),
        (
            0 <= request.topk_sample_logprobs <= vocab,
            f"topk_sample_logprobs must be between 0 and the vocabulary size {vocab}, "
            f"got {request.topk_sample_logprobs}",
        ),
    ]
    bf = request.budget_forcing
    if bf is not None:
        checks += [
            (bf.min_thinking_tokens >= 0, "budget_forcing.min_thinking_tokens must be >= 0"),
            (
                bf.max_thinking_tokens is None or bf.max_thinking_tokens >= max(1, bf.min_thinking_tokens),
                "budget_forcing.max_thinking_tokens must be >= 1 and >= min_thinking_tokens",
            ),
            (bool(bf.end_thinking), "budget_forcing.end_thinking must be a non-empty string"),
            (bool(bf.wait_text), "budget_forcing.wait_text must be a non-empty string"),
        ]
    for ok, message in checks:
        if not ok:
            raise SamplingInputError(message)
    total = len(request.prompt_tokens) + p.max_tokens
    if max_context is not None and total > max_context:
        raise SamplingInputError(
            f"prompt ({len(request.prompt_tokens)} tokens) + max_tokens ({p.max_tokens}) = {total} "
            f"exceeds the model's context length {max_context}"
        )


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """EOS per the tokenizer and the generation config (chat models often list several end tokens)."""
    ids: set[int] = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _chunks(requests: list[SampleRequest]) -> list[list[SampleRequest]]:
    """Split into batches of at most MAX_BATCH_ROWS sequences (a single huge request still runs whole)."""
    chunks: list[list[SampleRequest]] = []
    rows = 0
    for request in requests:
        if chunks and rows + request.num_samples <= MAX_BATCH_ROWS:
            chunks[-1].append(request)
            rows += request.num_samples
        else:
            chunks.append([request])
            rows = request.num_samples
    return chunks


# --- one sequence's state -----------------------------------------------------------------------------------


def _seeded_generator(seed: int | None, sample_index: int) -> torch.Generator:
    """Each sample draws from its own stream, so a seeded request reproduces whatever else is in the batch."""
    if seed is None:
        value = secrets.randbits(63)
    else:
        value = int(
            np.random.SeedSequence([seed & (2**63 - 1), sample_index]).generate_state(1, np.uint64)[0]
        )
    return torch.Generator().manual_seed(value)


def _find_text(decode: Callable[[list[int]], str], tokens: list[int], needle: str, window: int) -> int | None:
    """Index of the first token of a NEW occurrence of `needle` that ends in the last token, else None.

    Text, not token ids, is matched because a string can be tokenized many ways; the occurrence must involve
    the last token so that text forced earlier can never match again.
    """
    tail = tokens[-window:]
    if needle not in decode(tail) or needle in decode(tail[:-1]):
        return None
    for k in range(1, len(tail) + 1):
        if needle in decode(tail[-k:]):
            return len(tokens) - k
    return None  # unreachable: the whole tail contains the needle


class _Sequence:
    """One sampled sequence: its tokens, logprobs, stop rules and budget-forcing state machine."""

    def __init__(
        self,
        request: SampleRequest,
        sample_index: int,
        eos_ids: frozenset[int],
        tokenizer,
        width: int,
        rope_delta: int = 0,
    ):
        p = request.params
        self.params = p
        self.sample_index = sample_index
        self.on_token = request.on_token if request.budget_forcing is None else None
        self.generator = _seeded_generator(p.seed, sample_index)
        self.stop_ids = frozenset(p.stop_token_ids) | (eos_ids if p.stop_at_eos else frozenset())
        self.topk = request.topk_sample_logprobs
        self.budget = request.budget_forcing
        self.thinking = self.budget is not None
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        needles = list(p.stop_strings) + ([self.budget.end_thinking] if self.budget else [])
        self.window = max((len(s.encode()) for s in needles), default=0) + 2
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampling_logprobs: list[float] = []
        self.topk_logprobs: list[list[tuple[int, float]]] = []
        self.forced: deque[int] = deque()
        self.prompt_tokens_last = request.prompt_tokens[-1]
        self.feed = self.prompt_tokens_last  # the token the next forward takes for this row
        # cache column of the prompt's last token (prompts are left-padded) and of each output token once fed
        self.prompt_column = width - 1
        self.rope_delta = rope_delta  # next position minus visible tokens: nonzero after images (M-RoPE)
        self.columns: list[int] = []
        self.stop_reason: Literal["stop", "length"] | None = None if p.max_tokens > 0 else "length"

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def needs_sample(self) -> bool:
        return not self.forced

    def result(self) -> SampledSequence:
        assert self.stop_reason is not None
        topk = self.topk_logprobs if self.topk else None
        return SampledSequence(
            list(self.tokens), list(self.logprobs), self.stop_reason, topk, list(self.sampling_logprobs)
        )

    def advance(self, logp: torch.Tensor, sampled: int, drawn_logp: float, column: int) -> list[int]:
        """Take the next token (forced or sampled), apply stop and budget rules; return cache columns to hide.

        `logp` is the raw (temperature 1) next-token distribution, `drawn_logp` the sampled token's
        log-probability under the distribution it was drawn from; `column` is where the fed token will go.
        """
        forced = bool(self.forced)
        self._append(self.forced.popleft() if forced else sampled, logp, 0.0 if forced else drawn_logp)
        if not forced:
            hidden = self._apply_stop_rules(column)
            if hidden:
                return hidden
        limit = self.budget.max_thinking_tokens if self.thinking else None
        if limit is not None and not self.done and len(self.tokens) >= limit:
            self.thinking = False
            self.forced.extend(self._encode(self.budget.end_thinking + self.budget.answer_prefix))
        if not self.done and len(self.tokens) >= self.params.max_tokens:
            self.stop_reason = "length"
        if not self.done:
            self.feed = self.tokens[-1]
            self.columns.append(column)
        if self.on_token is not None:
            self.on_token(self.sample_index, self.tokens[-1])
        return []

    def _append(self, token: int, logp: torch.Tensor, drawn_logp: float) -> None:
        self.tokens.append(token)
        self.logprobs.append(float(logp[token]))
        self.sampling_logprobs.append(drawn_logp)
        if self.topk:
            values, ids = logp.topk(self.topk)
            self.topk_logprobs.append(list(zip(ids.tolist(), values.tolist(), strict=True)))

    def _apply_stop_rules(self, column: int) -> list[int]:
        """Stop, close thinking, or take back a premature close; return cache columns to hide."""
        start = self._stop_start()
        closing = self._find(self.budget.end_thinking) if self.thinking else None
        if self.thinking and (start is not None or closing is not None):
            begin = min(i for i in (start, closing) if i is not None)
            if begin < self.budget.min_thinking_tokens:
                return self._take_back(begin, column)
            if closing is not None and (start is None or closing <= start):
                self.thinking = False
                return []
        if start is not None:
            self.stop_reason = "stop"
        return []

    def _stop_start(self) -> int | None:
        if self.tokens[-1] in self.stop_ids:
            return len(self.tokens) - 1
        found = [i for s in self.params.stop_strings if (i := self._find(s)) is not None]
        return min(found) if found else None

    def _find(self, needle: str) -> int | None:
        return _find_text(self._decode, self.tokens, needle, self.window)

    def _take_back(self, begin: int, column: int) -> list[int]:
        """Drop tokens[begin:] and queue wait_text in their place; return the cache columns to hide.

        The token before `begin` is fed again at `column` (same token, same position, same visible context, so
        the same cache entry), which makes the next forward yield the distribution at slot `begin` for the
        forced tokens' logprobs, without keeping any past distributions around.
        """
        if begin > 0:
            self.feed = self.tokens[begin - 1]
            hidden = self.columns[begin - 1 :]
            self.columns[begin - 1 :] = [column]
        else:
            self.feed = self.prompt_tokens_last
            hidden = [self.prompt_column, *self.columns]
            self.columns, self.prompt_column = [], column
        del (
            self.tokens[begin:],
            self.logprobs[begin:],
            self.sampling_logprobs[begin:],
            self.topk_logprobs[begin:],
        )
        self.forced.extend(self._encode(self.budget.wait_text))
        return hidden


# --- the batch ----------------------------------------------------------------------------------------------


def _pick_tokens(logits: torch.Tensor, seqs: list[_Sequence]) -> tuple[list[int], list[float]]:
    """Sample one token per row with that row's temperature / top-k / top-p and its own generator; return the
    tokens and each one's log-probability under the (truncated, renormalized) distribution it was drawn from.

    Inverse-CDF sampling with one uniform draw per row keeps rows independent of each other; temperature 0 is
    argmax (drawn with probability 1). Rows that are being forced still get a candidate, which is ignored (and
    draws no randomness).
    """
    rows, vocab = logits.shape
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
    greedy = temps == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in seqs])
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float64)
    truncate = bool((top_k < vocab).any() or (top_p < 1).any())
    if truncate:
        scaled, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(scaled, dim=-1).double()
    if truncate:
        probs = probs * (torch.arange(vocab)[None, :] < top_k[:, None])
        probs = probs / probs.sum(-1, keepdim=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p[:, None])
    cdf = probs.cumsum(-1)
    u = torch.tensor(
        [
            float(torch.rand((), generator=s.generator, dtype=torch.float64)) if s.needs_sample else 0.0
            for s in seqs
        ],
        dtype=torch.float64,
    )
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=vocab - 1)
    tokens = order.gather(1, index) if truncate else index
    tokens = torch.where(greedy[:, None], logits.argmax(-1, keepdim=True), tokens)
    drawn = torch.where(greedy, 0.0, (probs.gather(1, index)[:, 0] / cdf[:, -1]).log())
    return tokens[:, 0].tolist(), drawn.tolist()


def _prompt_scores(
    request: SampleRequest, logits: torch.Tensor
) -> tuple[list[float | None] | None, list[list[tuple[int, float]] | None] | None]:
    """Prompt logprobs (and top-k) from the last len(prompt) prefill positions of this request's row."""
    if not request.prompt_logprobs and not request.topk_prompt_logprobs:
        return None, None
    m = len(request.prompt_tokens)
    keep = logits.shape[0]
    logp = torch.log_softmax(logits[keep - m : keep - 1].float().cpu(), dim=-1)
    targets = torch.tensor(request.prompt_tokens[1:], dtype=torch.long)
    scores: list[float | None] | None = None
    if request.prompt_logprobs:
        scores = [None, *logp.gather(1, targets[:, None])[:, 0].tolist()]
    topk: list[list[tuple[int, float]] | None] | None = None
    if request.topk_prompt_logprobs:
        values, ids = logp.topk(request.topk_prompt_logprobs, dim=-1)
        topk = [
            None,
            *(list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)),
        ]
    return scores, topk


def _generate_batch(
    model,
    autocast: torch.dtype | None,
    tokenizer,
    requests: list[SampleRequest],
    eos_ids: frozenset[int],
    vision: Vision | None,
) -> list[SampleResult]:
    device = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r.prompt_tokens) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_tokens) :] = torch.tensor(r.prompt_tokens)
        mask[i, width - len(r.prompt_tokens) :] = 1
    scored = [len(r.prompt_tokens) for r in requests if r.prompt_logprobs or r.topk_prompt_logprobs]
    ids, mask_on = ids.to(device), mask.to(device)
    extra = {"position_ids": (mask_on.cumsum(1) - 1).clamp(min=0)}
    deltas = [0] * len(requests)
    if vision is not None and any(r.pixels is not None for r in requests):
        extra, rope_deltas = model_inputs(vision, ids, mask_on, [r.pixels for r in requests])
        deltas = rope_deltas.tolist()
    logits, cache = causal_logits(
        model,
        autocast,
        keep=max(scored, default=1),
        input_ids=ids,
        attention_mask=mask_on,
        use_cache=True,
        **extra,
    )
    prompt_scores = [_prompt_scores(r, logits[i]) for i, r in enumerate(requests)]
    owner = [i for i, r in enumerate(requests) for _ in range(r.num_samples)]
    seqs = [
        _Sequence(r, j, eos_ids, tokenizer, width, deltas[i])
        for i, r in enumerate(requests)
        for j in range(r.num_samples)
    ]
    step = functools.partial(causal_logits, model, autocast, keep=1, use_cache=True)
    _decode(step, cache, mask, logits[:, -1].cpu(), owner, seqs, device)
    return [
        SampleResult([s.result() for s, o in zip(seqs, owner, strict=True) if o == i], *scores)
        for i, scores in enumerate(prompt_scores)
    ]


def _decode(step, cache, mask: torch.Tensor, last: torch.Tensor, owner: list[int], seqs, device) -> None:
    """The decode loop: one forward per step (`step`, which returns logits and the cache) over the sequences
    still running."""
    index = torch.tensor(owner)
    cache.batch_select_indices(index.to(device))
    mask, last = mask[index], last[index]
    active = [s for s in seqs if not s.done]
    if len(active) < len(seqs):
        keep = torch.tensor([i for i, s in enumerate(seqs) if not s.done], dtype=torch.long)
        cache.batch_select_indices(keep.to(device))
        mask, last = mask[keep], last[keep]
    column = mask.shape[1]
    while active:
        logp = torch.log_softmax(last, dim=-1)
        picks, drawn = _pick_tokens(last, active)
        for row, seq in enumerate(active):
            for hidden in seq.advance(logp[row], picks[row], drawn[row], column):
                mask[row, hidden] = 0
        keep = [i for i, s in enumerate(active) if not s.done]
        if not keep:
            return
        if len(keep) < len(active):
            cache.batch_select_indices(torch.tensor(keep, device=device))
            mask = mask[keep]
            active = [active[i] for i in keep]
        positions = mask.sum(1, keepdim=True) + torch.tensor([[s.rope_delta] for s in active])
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
        logits, cache = step(
            input_ids=torch.tensor([[s.feed] for s in active], device=device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
        )
        last = logits[:, -1].cpu()
        column += 1
