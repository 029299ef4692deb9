"""`nightlab report`: report.md, progress.png and results.tsv for one run, all derived from the journal.

The summary numbers (baseline, best, noise floor, counts, spend) are the loop's own state rebuilt from the
journal (`state.from_journal`), so the report and the run can never disagree about them. Descriptions and
reasons are written by proposals and experiments nobody reviewed: they appear `terminal_safe`, so a report
shown in a terminal (`cat report.md`) cannot set the clipboard or clear the screen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nightlab.config import NightlabConfig
from nightlab.errors import NightlabError
from nightlab.research import decide
from nightlab.research.journal import STATE_DIR, Experiment, HeldoutResult, Journal, Run
from nightlab.research.plots import plot_curves, plot_progress
from nightlab.research.safe_text import terminal_safe
from nightlab.research.state import LoopState, from_journal, plateaus


class ReportError(NightlabError, RuntimeError):
    """Nothing to report (no journal, no such run)."""


@dataclass
class ReportFiles:
    report: Path
    plot: Path
    tsv: Path
    curves: Path | None = None  # training progress, when metric.progress gave the runs curves


def find_run(journal: Journal, tag: str | None) -> Run:
    run = journal.find_run(tag) if tag else journal.latest_run()
    if run is None:
        known = ", ".join(r.tag for r in journal.runs()) or "none yet"
        raise ReportError(
            f"no run {tag!r} in the journal (runs: {known})" if tag else "the journal has no runs yet"
        )
    return run


def _f(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _cell(text: str | None, limit: int = 120) -> str:
    one = " ".join(terminal_safe(text or "").split()).replace("|", "\\|")
    return one if len(one) <= limit else one[: limit - 1] + "…"


def overfit_suspected(val_gain: float, test_gain: float, bar: float) -> bool:
    """A validation gain that test does not share: the gap is beyond the noise and under half of it carried
    over.

    Both conditions, because two splits rarely show a real gain at exactly the same size: a gap beyond the
    seed noise alone would also flag honest gains measured on splits of different difficulty.
    """
    return val_gain - test_gain > bar and test_gain < val_gain / 2


def heldout_lines(results: list[HeldoutResult], goal: decide.Goal, bar: float) -> list[str]:
    """Validation vs test for the baseline and the best; flag a gain that did not carry over to test."""
    by_label = {r.label: r for r in results}
    lines = ["| | commit | validation | test | sandbox |", "|---|---|---|---|---|"]
    for label in ("baseline", "best"):
        if r := by_label.get(label):
            lines.append(
                f"| {label} | `{r.commit_sha[:7]}` | {_f(r.validation)} | {_f(r.test)} | "
                f"{_sandbox_cell(r.sandboxed)} |"
            )
    base, best = by_label.get("baseline"), by_label.get("best")
    if base and best and None not in (base.validation, base.test, best.validation, best.test):
        val_gain = decide.gain(best.validation, base.validation, goal)
        test_gain = decide.gain(best.test, base.test, goal)
        lines += ["", f"Gain over the baseline: validation {val_gain:+.6g}, test {test_gain:+.6g}."]
        if overfit_suspected(val_gain, test_gain, bar):
            lines.append(
                f"\n**Warning: the validation gain exceeds the test gain by {val_gain - test_gain:.6g}, "
                f"more than the noise bar ({bar:.6g}), and less than half of it carried over to the test "
                "split. The kept changes may be fitting the validation split.**"
            )
        else:
            lines.append(
                "\nThe gain carried over to the test split (its gap to the validation gain is within the "
                f"noise bar {bar:.6g}, or at least half of the validation gain remains on test)."
            )
    failed = [r for r in results if None in (r.validation, r.test)]
    if failed:
        lines.append(
            "\nA held-out scoring failed; see its log: " + ", ".join(r.log_path or "" for r in failed)
        )
    elif base and not best:
        lines.append("\nNothing was kept, so only the baseline was scored on the test split.")
    return lines


def _sandbox_cell(sandboxed: bool | None) -> str:
    """A held-out row's sandbox flag; rows written before nightlab recorded it have none."""
    return "not recorded" if sandboxed is None else "on" if sandboxed else "**off**"


def sandbox_lines(records: Sequence[Experiment]) -> list[str]:
    """How the experiments ran, one line per sandbox state with its reason; unsandboxed runs stand out."""
    groups: dict[tuple[bool, str], int] = {}
    for r in records:
        key = (bool(r.sandboxed), r.sandbox_reason or "")
        groups[key] = groups.get(key, 0) + 1
    lines = []
    for (on, reason), count in sorted(groups.items(), reverse=True):
        what = f"{count} of {len(records)} journal rows"
        if on:
            lines.append(f"- sandbox: on for {what} ({reason or 'bubblewrap'})")
        else:
            lines.append(
                f"- **sandbox: off for {what}: {reason or 'unsandboxed'}.** Those experiments ran as your "
                "user and could reach the journal, the held-out split and the network (see docs/integrity.md)"
            )
    return lines or ["- sandbox: no experiments yet"]


def quarantine_lines(records: Sequence[Experiment]) -> list[str]:
    """The results that were too good to take on their word: those quarantined (never kept) and the
    implausible gains kept after re-verification."""
    held = [r for r in records if r.quarantine]
    if not held:
        return []
    lines = [
        "## Quarantined and implausible results",
        "",
        "Each of these was far past what the noise allows in one step, or past what the metric can honestly "
        "reach (docs/integrity.md, the plausibility guard). A `quarantine` was never kept; a `keep` held up "
        "in re-runs beside the best, but a gain this large deserves a look at its diff and log.",
        "",
        "| # | decision | first run | runs | why it was held | description |",
        "|---|---|---|---|---|---|",
    ]
    for r in held:
        first = r.metric_runs[0] if r.metric_runs else None
        lines.append(
            f"| {r.number} | {r.decision} | {_f(first)} | {len(r.metric_runs)} | {_cell(r.quarantine)} | "
            f"{_cell(r.description, 80)} |"
        )
    return [*lines, ""]


def remeasure_lines(records: Sequence[Experiment], noise: float | None) -> list[str]:
    """The best as recorded and as re-measured beside each re-run candidate: how far the machine drifted."""
    paired = [r for r in records if r.best_reruns and r.best_before is not None]
    if not paired:
        return []
    lines = [
        "## The best, re-measured beside the candidates",
        "",
        "A candidate is confirmed against the best run again in the same period, not against the best's "
        "recorded mean; the shift between the two is the machine's drift (or the noise).",
        "",
        "| # | best as recorded | best re-measured | runs | shift | shift / noise |",
        "|---|---|---|---|---|---|",
    ]
    for r in paired:
        now = sum(r.best_reruns) / len(r.best_reruns)
        shift = now - r.best_before
        lines.append(
            f"| {r.number} | {_f(r.best_before)} | {_f(now)} | {len(r.best_reruns)} | {shift:+.6g} | "
            f"{_f(shift / noise, 3) if noise else '-'} |"
        )
    return [*lines, ""]


def plateau_lines(candidates: Sequence[Experiment], config: NightlabConfig) -> list[str]:
    """The stretches of `proposer.plateau_after` or more candidates in a row that kept nothing, and the
    duplicates the novelty gate refused to run."""
    after = config.proposer.plateau_after
    spans = plateaus(candidates, after)
    duplicates = sum(r.decision == "duplicate" for r in candidates)
    if not spans and not duplicates:
        return []
    lines = ["## Plateaus and repeats", ""]
    for first, last in spans:
        count = sum(first <= r.number <= last for r in candidates)
        lines.append(
            f"- plateau: #{first} to #{last}, {count} experiments in a row kept nothing (plateau_after "
            f"{after}, on_plateau = {config.proposer.on_plateau})"
        )
    if duplicates:
        lines.append(
            f"- {duplicates} proposals repeated code already measured and were not run (`duplicate`)"
        )
    return [*lines, ""]


def build_report(root: Path, tag: str | None = None, out: Path | None = None) -> ReportFiles:
    """Write report.md, progress.png, results.tsv and, where runs have progress curves, curves.png for a run
    (default: the latest) into `out`."""
    root = Path(root).resolve()
    if not (root / STATE_DIR / "journal.sqlite").is_file():
        raise ReportError(f"{root} has no nightlab journal yet; start with `nightlab run`")
    journal = Journal.for_workspace(root)
    try:
        journal.verify_chain()
        run = find_run(journal, tag)
        out = Path(out) if out else root / STATE_DIR / "reports" / run.tag
        out.mkdir(parents=True, exist_ok=True)
        records = journal.experiments(run.id)
        config = NightlabConfig.model_validate(run.config)
        state = from_journal(LoopState(), records, run.base_commit, config.experiment)
        plot = plot_progress(records, run.metric_name, config.metric.goal, out / "progress.png", state.noise)
        curves = plot_curves(records, config.metric.progress or "progress", out / "curves.png")
        tsv = journal.export_tsv(out / "results.tsv", run.id)
        text = _markdown(run, config, records, journal.heldout(run.id), state, curves is not None)
        report = out / "report.md"
        report.write_text(text, encoding="utf-8")
    finally:
        journal.close()
    return ReportFiles(report, plot, tsv, curves)


def _markdown(
    run: Run,
    config: NightlabConfig,
    records: list[Experiment],
    heldout: list[HeldoutResult],
    state: LoopState,
    with_curves: bool = False,
) -> str:
    goal, name, noise = config.metric.goal, run.metric_name, state.noise
    candidates = [r for r in records if r.kind == "candidate"]
    keeps = [r for r in candidates if r.decision == "keep"]
    baseline, best = state.baseline, state.best
    total_gain = decide.gain(best, baseline, goal) if best is not None and baseline is not None else None
    tokens = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in records)
    proposers = sorted({r.proposer for r in candidates if r.proposer})
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(records[0].started_at)) if records else "-"
    lines = [
        f"# nightlab report: {config.workspace.name}, run `{run.tag}`",
        "",
        f"- branch `{run.branch}` from `{run.source_branch}` at `{run.base_commit[:7]}`; started {started}",
        f"- proposer: {', '.join(proposers) or '-'}",
        *sandbox_lines(records),
        f"- metric: `{name}` ({goal}), channel `{config.metric.channel}`; budget "
        f"{config.experiment.budget_seconds:g}s per experiment",
        "",
        "## Summary",
        "",
        "| baseline | best | gain | noise floor (pooled) | experiments | kept | keep rate | LLM cost |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_f(baseline)} | {_f(best)} | {_f(total_gain)} | {_f(noise, 3)} | {state.experiments} | "
        f"{state.keeps} | {state.keep_rate:.0%} | ${state.cost_usd:.4f} ({tokens} tokens) |",
        "",
        "Decisions: " + (", ".join(f"{k} {v}" for k, v in sorted(state.decisions.items())) or "none yet"),
        "",
        "![progress](progress.png)",
        "",
        *(["## Training progress", "", "![training progress](curves.png)", ""] if with_curves else []),
        "## Kept changes",
        "",
    ]
    if keeps:
        lines += [
            "| # | commit | " + name + " | margin | margin / noise | P(better) | description |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in keeps:
            confirmed = " (confirmed)" if len(r.metric_runs) > 1 else ""
            confirmed += " (implausible, re-verified)" if r.quarantine else ""
            lines.append(
                f"| {r.number} | `{(r.commit_sha or '')[:7]}` | {_f(r.metric)} | {_f(r.margin)} | "
                f"{_f(r.sigmas, 3)}{confirmed} | {_f(r.probability, 3)} | {_cell(r.description)} |"
            )
    else:
        lines.append("No change beat the baseline by more than the noise.")
    lines += [
        "",
        *quarantine_lines(records),
        *remeasure_lines(records, noise),
        *plateau_lines(candidates, config),
        "## Validation vs held-out test",
        "",
    ]
    if heldout:
        lines += heldout_lines(heldout, goal, decide.bar(noise or 0.0, config.decide))
    elif config.experiment.heldout:
        lines.append(
            "Not scored yet: `nightlab report --final` scores the baseline and the best on the test split."
        )
    else:
        lines.append("No held-out step configured (`experiment.heldout`).")
    lines += [
        "",
        "## All experiments",
        "",
        f"| # | decision | {name} | description | reason |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        what = "baseline" if r.kind == "baseline" else r.description
        lines.append(
            f"| {r.number} | {r.decision} | {_f(r.metric)} | {_cell(what, 80)} | {_cell(r.reason, 100)} |"
        )
    return "\n".join(lines) + "\n"
