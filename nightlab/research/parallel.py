"""Experiments in parallel on Ray (`nightlab run --workers N`), decided as honestly as one at a time.

The driver (this process) keeps everything that decides: it asks the proposer, commits each candidate on the
best of the moment (the run's branch does not move), marks it pending in the journal, and hands it to a free
worker (worker.py: a Ray actor with its own worktree, reserving `[parallel] cpus_per_experiment` and
`gpus_per_experiment`; Ray places the actors, locally or on a cluster). Results come back in any order and
only the driver writes the journal:

- a candidate that passed against the best it was proposed on, while that is still the best, is kept: the
  branch moves to it;
- one that passed while another keep moved the best is rebased onto the new best (its change applied
  there again, checked for novelty) and run again from the start, at most `[parallel] max_rebases` times;
  a change that no longer applies, or still finds the best moved, is recorded `stale`;
- anything else is recorded as it came back.

A kill -9 of the driver leaves the running candidates pending in the journal: the next `nightlab run` records
each once as interrupted, stops what the workers left running and removes their worktrees. A worker that
dies (its process killed, its node lost) costs the candidate it ran, recorded as a crash saying so; a fresh
worker takes its slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nightlab.research import worktrees
from nightlab.research.journal import Experiment, Pending
from nightlab.research.proposers.base import Proposal
from nightlab.research.worker import ExperimentWorker

if TYPE_CHECKING:
    from nightlab.research.loop import ResearchLoop


@dataclass
class Flight:
    """A candidate out on a worker: its record so far and the proposal it came from."""

    experiment: Experiment
    proposal: Proposal
    slot: int = -1
    notes: list[str] = field(default_factory=list)  # what happened before this run (rebases)


class WorkerPool:
    """`workers` Ray actors, one per slot, each set up in its worktree before the first candidate."""

    def __init__(self, loop: ResearchLoop, workers: int, address: str | None) -> None:
        from nightlab.research.loop import LoopError

        try:
            import ray
        except ImportError as exc:
            raise LoopError(
                f"--workers {workers} runs experiments on Ray, which is not installed: "
                "pip install 'nightlab[parallel]' (or pip install ray), or run with --workers 1"
            ) from exc
        self.loop = loop
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(
                # "local": a cluster of this run's own. Without it Ray would join the last cluster started on
                # this machine, which a killed run leaves behind, dead or dying.
                address=address or "local",
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        par = loop.config.parallel
        self.actor_class = ray.remote(
            num_cpus=par.cpus_per_experiment,
            num_gpus=par.gpus_per_experiment,
            max_restarts=0,
            max_task_retries=0,
        )(ExperimentWorker)
        self.actors: dict[int, Any] = {}
        self.idle: list[int] = []
        for slot in range(workers):
            self.actors[slot] = self._start(slot)
        self._wait_ready(list(range(workers)))

    def _start(self, slot: int) -> Any:
        loop = self.loop
        args = (str(loop.root), loop.run, loop.config, loop.state.sandboxed, slot)
        return self.actor_class.remote(*args)

    def _wait_ready(self, slots: list[int]) -> None:
        """Wait until the slots' workers are set up; a worker that cannot start stops the run, saying why."""
        import ray

        from nightlab.research.loop import LoopError

        try:
            ray.get([self.actors[s].ready.remote() for s in slots])
        except ray.exceptions.RayError as exc:
            raise LoopError(f"a parallel worker could not start: {_cause(exc)}") from exc
        self.idle += slots

    def submit(self, flight: Flight, state: Any) -> Any:
        """Run `flight` on an idle worker against `state`; the reference its record comes back on."""
        flight.slot = self.idle.pop(0)
        return self.actors[flight.slot].evaluate.remote(state, flight.experiment)

    def replace_worker(self, slot: int) -> None:
        """A fresh worker in a dead one's slot (what the dead one left running is stopped first)."""
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        worktrees.stop(self.loop.root, self.loop.run.tag, slot)
        self.actors[slot] = self._start(slot)
        self._wait_ready([slot])

    def shutdown(self) -> None:
        """Stop every worker and what it runs, remove the worktrees, and Ray if this run started it."""
        import ray

        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        worktrees.clear(self.loop.ws, self.loop.run.tag)
        if self.owns_ray:
            ray.shutdown()


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside Ray, not the wrapper's story."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class ParallelExperiments:
    """The experiment phase of a run with `workers` candidates at once (see the module docstring)."""

    def __init__(self, loop: ResearchLoop, workers: int) -> None:
        self.loop, self.workers = loop, workers
        self.flights: dict[Any, Flight] = {}

    def run(self, started: float) -> str:
        """Experiment until a stop rule and until every running candidate is recorded; why the run stopped."""
        import ray

        loop = self.loop
        pool = WorkerPool(loop, self.workers, loop.options.ray_address or loop.config.parallel.ray_address)
        loop.view.message(f"{self.workers} workers ready on Ray")
        reason = ""
        try:
            while True:
                while not reason and pool.idle:
                    reason = loop._stop_reason(started, running=len(self.flights)) or self._launch(pool)
                if not self.flights:
                    return reason
                ready, _ = ray.wait(list(self.flights), num_returns=1)
                self._land(pool, ready[0])
        finally:
            pool.shutdown()

    def _running(self) -> list[Experiment]:
        return [f.experiment for f in self.flights.values()]

    def _launch(self, pool: WorkerPool) -> str:
        """Propose, commit and send out one candidate (or record why it needs no run); why no proposal
        came, or ""."""
        loop = self.loop
        proposal = loop._propose([e.description for e in self._running()])
        if isinstance(proposal, str):
            return proposal
        started = loop._candidate(proposal)
        loop.journal.mark_pending(Pending(started))
        prepared = self._prepare(started, proposal)
        if prepared.decision:
            loop._conclude(proposal, prepared)
        else:
            self._send(pool, Flight(prepared, proposal))
        return ""

    def _prepare(self, started: Experiment, proposal: Proposal) -> Experiment:
        """The candidate committed on the current best, the driver's tree left at the best."""
        loop = self.loop
        best = loop.state.best_commit
        try:
            return loop._prepare_candidate(started, proposal, best, self._running())
        finally:
            loop.executor.checkout(best)

    def _send(self, pool: WorkerPool, flight: Flight) -> None:
        loop = self.loop
        loop.journal.mark_pending(Pending(flight.experiment))
        reference = pool.submit(flight, loop.state)
        self.flights[reference] = flight
        started = flight.experiment
        limit = started.train_limit or loop.config.experiment.budget_seconds
        loop.view.phase_started(started.number, started.description, f"on worker {flight.slot}", limit)

    def _land(self, pool: WorkerPool, reference: Any) -> None:
        """Take in one finished run: record it, keep it, or rebase it and send it out again."""
        import ray

        from nightlab.research.loop import LoopError

        flight = self.flights.pop(reference)
        try:
            judged: Experiment = ray.get(reference)
        except ray.exceptions.RayActorError as exc:
            pool.replace_worker(flight.slot)
            why = f"the worker running it died ({_cause(exc)}); not re-run"
            self._record(flight, replace(flight.experiment, decision="crash", reason=why))
            return
        except ray.exceptions.RayTaskError as exc:
            number = flight.experiment.number
            raise LoopError(f"experiment #{number} failed on its worker: {_cause(exc)}") from exc
        pool.idle.append(flight.slot)
        best = self.loop.state.best_commit
        if judged.decision == "keep" and judged.parent_commit != best:
            self._rebase(pool, flight, judged)
            return
        if judged.decision == "keep":
            assert judged.commit_sha is not None
            self.loop.executor.checkout(judged.commit_sha)  # the branch moves on to the kept change
        self._record(flight, judged)

    def _rebase(self, pool: WorkerPool, flight: Flight, judged: Experiment) -> None:
        """A passing candidate whose best moved while it ran: onto the new best and again, or `stale`."""
        loop = self.loop
        old, new = (judged.parent_commit or "")[:7], loop.state.best_commit[:7]
        scored = f"{judged.metric:.6g}" if judged.metric is not None else "passed"
        if len(flight.notes) >= loop.config.parallel.max_rebases:
            why = f"stale: passed on {old} ({scored}) but the best had moved again, to {new}"
            self._record(flight, replace(judged, decision="stale", reason=why))
            return
        prepared = self._prepare(flight.experiment, flight.proposal)
        if prepared.decision == "invalid":
            why = f"stale: passed on {old} ({scored}), does not apply to the best {new}: {prepared.reason}"
            self._record(flight, replace(judged, decision="stale", reason=why))
            return
        flight.notes.append(f"passed on {old} ({scored}) while the best moved; rebased onto {new}, run again")
        flight.experiment = prepared
        if prepared.decision:  # a duplicate once rebased
            self._record(flight, prepared)
        else:
            self._send(pool, flight)

    def _record(self, flight: Flight, outcome: Experiment) -> None:
        if flight.notes:
            outcome = replace(outcome, reason="; ".join([*flight.notes, outcome.reason]))
        self.loop._conclude(flight.proposal, outcome)
