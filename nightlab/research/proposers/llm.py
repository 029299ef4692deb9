"""The `llm` proposer: ask a chat model (any OpenAI-compatible endpoint) for the next experiment.

The model sees program.md, the editable files, the goal and what was tried, and answers with a description
and SEARCH/REPLACE blocks. A malformed answer is sent back with the error so the model can fix it; when the
retries run out, `propose` still returns the last attempt (with the error in its rationale) so that the loop
records it as `invalid` and moves on, instead of ending the night's run.

Its section is `[proposer.llm]` (`LLMSection`); the `openai` client is imported when a proposer is built.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
from nightlab.research.memory import TokenCounter, render_memory, token_counter
from nightlab.research.memory_notes import LessonWriter
from nightlab.research.proposers.base import (
    Outcome,
    PluggableProposer,
    Proposal,
    ProposalContext,
    ProposerSettings,
    ProposerUnavailable,
    Usage,
    register,
    running_note,
)
from nightlab.research.proposers.llm_tools import TOOLS, ToolBox

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


TOOLS_NOTE = """

Before answering you may call the tools to read the workspace's files (the harness too) and earlier
experiments (diff, log, metrics), or search the history; then answer in the format above, or call
submit_proposal with the same parts."""


class LLMSection(ProposerSettings):
    """`[proposer.llm]`: the endpoint and model to ask, how to ask, and the prices that --max-cost counts."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = Field(3, ge=0, description="re-asks after a malformed answer")
    temperature: float = 0.7
    input_price_per_mtok: float = Field(0.0, ge=0)
    output_price_per_mtok: float = Field(0.0, ge=0)
    tools: bool = Field(
        True, description="let the model read files and earlier experiments through function calls first"
    )
    tool_turns: int = Field(8, ge=0, description="the most rounds of tool calls before the model must answer")


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


def build_user_prompt(
    context: ProposalContext, memory_tokens: int, count: TokenCounter, notes: LessonWriter | None = None
) -> str:
    """The experiment brief: instructions, goal, editable files, the run's memory (at most `memory_tokens`
    by `count`, with the groups' lessons from `notes` where given), and the last rejection."""
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
    memory = render_memory(context.history, context.goal, context.metric_name, memory_tokens, count, notes)
    sections.append(f"# Experiments so far\n{memory}")
    if context.last_invalid_reason:
        rejected = context.last_invalid_reason
        sections.append(f"# Your previous proposal was not run\n{rejected}\nAvoid that mistake.")
    if running := running_note(context):
        sections.append(f"# Running now on other workers\n{running}")
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
        return cls(
            settings,
            memory_tokens=config.proposer.memory_tokens,
            workspace=workspace,
            hidden=config.sandbox.hidden_paths(),
            memory_notes=config.proposer.memory_notes,
        )

    @classmethod
    def check_run_options(cls, settings: LLMSection, max_cost: float | None) -> None:
        """--max-cost counts the spend from the model's prices; with both at 0 the cap would never stop."""
        if max_cost is not None and not (settings.input_price_per_mtok or settings.output_price_per_mtok):
            raise ConfigError(
                "--max-cost needs the model's prices to count what the run spends: set "
                "proposer.llm.input_price_per_mtok and proposer.llm.output_price_per_mtok (USD per million "
                "tokens) in nightlab.toml; with both at 0 the cap would never stop the run"
            )

    def __init__(
        self,
        config: LLMSection,
        memory_tokens: int = 4000,
        workspace: Path | None = None,
        hidden: list[Path] | None = None,
        memory_notes: Literal["off", "llm"] = "off",
    ) -> None:
        import openai

        self.config, self.memory_tokens = config, memory_tokens
        # Tools read the workspace, so they need one; an endpoint without function calling turns them off.
        self.workspace, self.hidden = workspace, hidden or []
        self.tools_work = config.tools and workspace is not None
        self._count: TokenCounter | None = None  # the model's tokenizer, loaded at the first proposal
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
        self.notes = LessonWriter.for_workspace(self.lesson, workspace) if memory_notes == "llm" else None
        self.notes_usage = Usage()  # the lessons' tokens since the last proposal, which then counts them

    def _complete(self, messages: list[dict[str, Any]], usage: Usage, tools: bool) -> Any:
        """One chat completion (offering the tools when `tools`); its message, its tokens added to `usage`."""
        import openai

        extra = {"tools": TOOLS} if tools else {}
        try:
            response = self.client.chat.completions.create(
                model=self.model,  # type: ignore[arg-type]
                messages=messages,  # type: ignore[arg-type]
                temperature=self.config.temperature,
                **extra,  # type: ignore[arg-type]
            )
        except openai.OpenAIError as exc:
            where = self.base_url or "the OpenAI API"
            # Unreachable, timing out, rate limited or failing (5xx) is worth waiting for; a refusal is not.
            outage = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
            error = LLMUnavailable if isinstance(exc, outage) else LLMError
            raise error(f"LLM request to {where} (model {self.model}) failed: {exc}") from exc
        if response.usage:
            usage.prompt_tokens += response.usage.prompt_tokens
            usage.completion_tokens += response.usage.completion_tokens
        return response.choices[0].message if response.choices else None

    def _ask(self, messages: list[dict[str, Any]], usage: Usage, toolbox: ToolBox | None) -> str:
        """The model's answer text. With a `toolbox` it may first call tools, for at most `tool_turns` rounds
        (then it is told to answer); `messages` grows with the calls and their results."""
        if toolbox is not None:
            for _ in range(self.config.tool_turns):
                if not self.tools_work:
                    break
                try:
                    message = self._complete(messages, usage, tools=True)
                except LLMUnavailable:
                    raise
                except LLMError:
                    self.tools_work = False  # the endpoint refused the tools: from now on, ask without them
                    break
                calls = getattr(message, "tool_calls", None) or []
                if not calls:
                    return (message.content or "") if message else ""
                messages.append(message.model_dump(exclude_none=True))
                for call in calls:
                    answer = toolbox.call(call.function.name, call.function.arguments)
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": answer})
                if toolbox.submitted is not None:
                    return toolbox.submitted
            else:
                if self.config.tool_turns:
                    messages.append(
                        {"role": "user", "content": "No more tool calls: answer now, in the format."}
                    )
        message = self._complete(messages, usage, tools=False)
        return (message.content or "") if message else ""

    def lesson(self, prompt: str) -> str:
        """The model's answer to a lesson request of the memory's `notes`, its tokens in `notes_usage`."""
        message = self._complete([{"role": "user", "content": prompt}], self.notes_usage, tools=False)
        return (message.content or "") if message else ""

    def count(self, text: str) -> int:
        if self._count is None:
            self._count = token_counter(self.model)
        return self._count(text)

    def propose(self, context: ProposalContext) -> Proposal:
        """Ask until the answer is usable or `max_retries` re-asks are spent; never returns None."""
        toolbox = (
            ToolBox(self.workspace, context, self.hidden) if self.tools_work and self.workspace else None
        )
        system = SYSTEM_PROMPT + (TOOLS_NOTE if toolbox is not None else "")
        brief = build_user_prompt(context, self.memory_tokens, self.count, self.notes)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": brief},
        ]
        usage, self.notes_usage = self.notes_usage, Usage()  # what its lessons cost counts as this proposal's
        for attempt_number in range(self.config.max_retries + 1):
            text = self._ask(messages, usage, toolbox)
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
