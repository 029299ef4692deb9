"""The `llm` proposer: ask a chat model (any OpenAI-compatible endpoint) for the next experiment.

The model sees program.md, the editable files, the goal and what was tried, and answers with a description
and SEARCH/REPLACE blocks. A malformed answer is sent back with the error so the model can fix it; when the
retries run out, `propose` still returns the last attempt (with the error in its rationale) so that the loop
records it as `invalid` and moves on, instead of ending the night's run.

Its section is `[proposer.llm]` (`LLMSection`); the `openai` client is imported when a proposer is built.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from nightlab.config import ConfigError
from nightlab.errors import NightlabError
from nightlab.research.edits import (
    FORMAT_EXAMPLE,
    EditError,
    apply_search_replace,
    format_search_replace,
    parse_search_replace,
)
from nightlab.research.proposers.base import (
    Outcome,
    PastExperiment,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    ProposerUnavailable,
    Usage,
    register,
)

if TYPE_CHECKING:
    from nightlab.config import NightlabConfig

_TRANSPORT_RETRIES = 5
_DESCRIPTION = re.compile(r"^[ \t*#>_-]*DESCRIPTION[ \t*_]*:[ \t*_]*(?P<text>\S.*?)[ \t*_]*$", re.I | re.M)
_RATIONALE = re.compile(
    r"^[ \t*#>_-]*RATIONALE[ \t*_]*:[ \t*_]*(?P<text>.*?)(?=\n\s*\n|\n\s*```|\n[^\n]*\n\s*<{5,9} ?SEARCH|\Z)",
    re.I | re.M | re.S,
)

SYSTEM_PROMPT = f"""You are a careful research engineer running one experiment at a time to improve a metric.
Each experiment is one change to the editable files; it is run, measured, and kept only if the metric
beats the current best by more than the noise. Prefer one clear idea per experiment, learn from the results so
far, and do not repeat what already failed.

Answer in exactly this format:
DESCRIPTION: one short line saying what this experiment changes
RATIONALE: a few sentences on why it should help (optional)

then one or more SEARCH/REPLACE blocks, each preceded by the file's path on its own line:
{FORMAT_EXAMPLE}

Rules for the blocks: SEARCH must copy the current lines exactly (indentation and comments included) and match
only one place, so include a few unchanged lines around the change when needed; keep blocks small; edit only
the editable files shown; to create a new file, leave SEARCH empty."""


class LLMSection(ProposerSettings):
    """`[proposer.llm]`: the endpoint and model to ask, how to ask, and the prices that --max-cost counts."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = Field(3, ge=0, description="re-asks after a malformed answer")
    temperature: float = 0.7
    input_price_per_mtok: float = Field(0.0, ge=0)
    output_price_per_mtok: float = Field(0.0, ge=0)
    history_limit: int = Field(30, ge=1)


def configured_model(config: LLMSection) -> str | None:
    """The model to ask: NIGHTLAB_LLM_MODEL, else nightlab.toml's; None when neither names one."""
    return os.environ.get("NIGHTLAB_LLM_MODEL") or config.model


class LLMError(NightlabError, RuntimeError):
    """The LLM endpoint could not be used (not configured, unreachable, or refusing the request)."""


class LLMUnavailable(LLMError, ProposerUnavailable):
    """The endpoint is down for now: unreachable, timing out, rate limiting or failing (5xx) after retries."""


@dataclass
class _Attempt:
    """One parsed answer: the proposal it would make, what is wrong with it, and whether its patch applies."""

    proposal: Proposal
    error: str | None
    patch_ok: bool


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    return "`" * max(3, longest + 1)


def _format_metric(value: float | None) -> str:
    return "none yet" if value is None else f"{value:.6g}"


def select_history(history: list[PastExperiment], goal: str, limit: int) -> list[PastExperiment]:
    """At most `limit` experiments: measured ones best first, then failures (crash, invalid...) newest first.

    A quarter of the room is kept for failures, so a long run still reminds the model what broke.
    """
    sign = 1 if goal == "minimize" else -1
    measured = sorted(
        (p for p in history if p.metric is not None and math.isfinite(p.metric)),
        key=lambda p: sign * p.metric,  # type: ignore[operator]
    )
    seen = {id(p) for p in measured}
    failed = [p for p in reversed(history) if id(p) not in seen]
    n_failed = min(len(failed), max(limit - len(measured), limit // 4))
    return measured[: limit - n_failed] + failed[:n_failed]


def _history_line(past: PastExperiment, metric_name: str) -> str:
    metric = "no metric" if past.metric is None else f"{metric_name}={past.metric:.6g}"
    reason = f" ({past.reason})" if past.reason else ""
    return f"- #{past.number} [{past.decision}, {metric}] {past.description}{reason}"


def build_user_prompt(context: ProposalContext, history_limit: int) -> str:
    """The experiment brief: instructions, goal, editable files, results so far, and the last rejection."""
    best = _format_metric(context.best_metric)
    goal = f"{context.goal.capitalize()} `{context.metric_name}`. Current best: {best}."
    if context.noise is not None:
        goal += f" Noise floor: {context.noise:.3g} (a change must beat the best by more than this)."
    files = []
    for path, text in sorted(context.files.items()):
        body = text if text.endswith("\n") else text + "\n"
        files.append(f"{path}\n{_fence(text)}\n{body}{_fence(text)}")
    sections = [
        f"# Instructions (program.md)\n{context.program.strip()}",
        f"# Goal\n{goal}",
        "# Editable files\n" + "\n\n".join(files),
    ]
    if context.history:
        ordered = select_history(context.history, context.goal, history_limit)
        shown = f"{len(ordered)} of {len(context.history)}" if len(ordered) < len(context.history) else "all"
        lines = "\n".join(_history_line(p, context.metric_name) for p in ordered)
        sections.append(f"# Experiments so far, best first ({shown})\n{lines}")
    else:
        sections.append("# Experiments so far\nNone yet besides the baseline.")
    if context.last_invalid_reason:
        rejected = context.last_invalid_reason
        sections.append(f"# Your previous proposal was not run\n{rejected}\nAvoid that mistake.")
    if context.elsewhere:
        lines = "\n".join(context.elsewhere)
        sections.append(
            f"# What worked on other machines (same workspace, normalised to one machine)\n{lines}"
        )
    if context.plateau:
        sections.append(
            f"# Plateau\nThe last {context.plateau} experiments kept nothing. Step back and try a different "
            "direction from the recent ones, not another variation of them."
        )
    sections.append("Propose the next experiment now, in the required format.")
    return "\n\n".join(sections)


def parse_answer(text: str, files: dict[str, str]) -> _Attempt:
    """Turn an answer into a proposal, checking its blocks against the files they edit."""
    match = _DESCRIPTION.search(text)
    rationale = _RATIONALE.search(text)
    proposal = Proposal(
        description=match.group("text").strip() if match else "",
        patch=text,
        patch_format="search_replace",
        rationale=rationale.group("text").strip() if rationale else "",
    )
    try:
        blocks = parse_search_replace(text)
        proposal.patch = format_search_replace(blocks)
        apply_search_replace(files, blocks)
    except EditError as exc:
        return _Attempt(proposal, str(exc), patch_ok=False)
    if not match:
        # Worth a re-ask, but the change itself is sound: if the retries run out it still runs, named by file.
        proposal.description = "change to " + ", ".join(sorted({b.path for b in blocks}))
        missing = (
            "the answer has no `DESCRIPTION: ...` line; "
            "start with one line saying what this experiment changes"
        )
        return _Attempt(proposal, missing, patch_ok=True)
    return _Attempt(proposal, None, patch_ok=True)


@register
class LLMProposer(PluggableProposer):
    """Proposes changes by chatting with a model through the official `openai` client."""

    name = "llm"
    settings = LLMSection

    @classmethod
    def from_config(cls, settings: LLMSection, workspace: Path, config: NightlabConfig) -> LLMProposer:
        return cls(settings)

    @classmethod
    def check_run_options(cls, settings: LLMSection, max_cost: float | None) -> None:
        """--max-cost counts the spend from the model's prices; with both at 0 the cap would never stop."""
        if max_cost is not None and not (settings.input_price_per_mtok or settings.output_price_per_mtok):
            raise ConfigError(
                "--max-cost needs the model's prices to count what the run spends: set "
                "proposer.llm.input_price_per_mtok and proposer.llm.output_price_per_mtok (USD per million "
                "tokens) in nightlab.toml; with both at 0 the cap would never stop the run"
            )

    def __init__(self, config: LLMSection) -> None:
        import openai

        self.config = config
        self.model = configured_model(config)
        if not self.model:
            raise LLMError(
                "no LLM model configured: set `model` under [proposer.llm] in nightlab.toml or the "
                "NIGHTLAB_LLM_MODEL environment variable (or use the `tune` proposer, which needs no LLM)"
            )
        self.base_url = os.environ.get("NIGHTLAB_LLM_BASE_URL") or config.base_url
        key = (
            os.environ.get("NIGHTLAB_LLM_API_KEY")
            or os.environ.get(config.api_key_env)
            or os.environ.get("OPENAI_API_KEY")
        )
        if not key and not self.base_url:
            raise LLMError(
                f"no API key for the LLM: set {config.api_key_env} or NIGHTLAB_LLM_API_KEY, or point "
                "[proposer.llm].base_url at a server that needs none"
            )
        # Local OpenAI-compatible servers accept any key, but the client insists on one. Connection errors,
        # rate limits and 5xx answers are retried with backoff by the client, so a brief outage at night
        # does not end the run.
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=key or "none", max_retries=_TRANSPORT_RETRIES
        )

    def _ask(self, messages: list[dict[str, str]]) -> tuple[str, int, int]:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model,  # type: ignore[arg-type]
                messages=messages,  # type: ignore[arg-type]
                temperature=self.config.temperature,
            )
        except openai.OpenAIError as exc:
            where = self.base_url or "the OpenAI API"
            # Unreachable, timing out, rate limited or failing (5xx) is worth waiting for; a refusal is not.
            outage = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
            error = LLMUnavailable if isinstance(exc, outage) else LLMError
            raise error(f"LLM request to {where} (model {self.model}) failed: {exc}") from exc
        usage = response.usage
        text = response.choices[0].message.content if response.choices else None
        return text or "", usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0

    def propose(self, context: ProposalContext) -> Proposal:
        """Ask until the answer is usable or `max_retries` re-asks are spent; never returns None."""
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": build_user_prompt(context, self.config.history_limit)},
        ]
        usage = Usage()
        for attempt_number in range(self.config.max_retries + 1):
            text, prompt_tokens, completion_tokens = self._ask(messages)
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            if text.strip():
                attempt = parse_answer(text, context.files)
            else:
                attempt = _Attempt(Proposal("(empty answer)", ""), "the answer was empty", patch_ok=False)
            if attempt.error is None:
                break
            if attempt_number < self.config.max_retries:
                retry = (
                    f"Your answer could not be used: {attempt.error}\n"
                    "Answer again, complete and in the required format."
                )
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": retry}]
        proposal = attempt.proposal
        proposal.usage = usage
        usage.cost_usd = (
            usage.prompt_tokens * self.config.input_price_per_mtok
            + usage.completion_tokens * self.config.output_price_per_mtok
        ) / 1e6
        if not attempt.patch_ok:
            # The loop's own apply step fails on this patch with the same error and records it as invalid.
            tries = self.config.max_retries + 1
            proposal.rationale = (
                f"unusable after {tries} answer(s): {attempt.error}\n{proposal.rationale}".strip()
            )
            proposal.description = proposal.description or "(malformed answer)"
        return proposal

    def feedback(self, proposal: Proposal, outcome: Outcome) -> None:
        """Nothing to learn here: the journal's history comes back in the next context."""
