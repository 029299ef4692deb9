"""One parallel worker: a Ray actor that measures candidates in its own worktree and returns the records.

The driver (parallel.py) owns the journal and the run's branch; a worker only runs. It is given the run, the
config (with the session's budget already applied) and, with each candidate, the loop's state at the time the
candidate was proposed, and it returns the candidate's record with the decision `measure_candidate` reached
against that state, after the checks where it would be kept. Ray makes it an actor (`ray.remote`) in the
driver, so this module imports no Ray and the class stays a plain one that tests can read.
"""

from __future__ import annotations

import os
from pathlib import Path

from nightlab.config import NightlabConfig
from nightlab.research import execution, worktrees
from nightlab.research.confirm import measure_candidate
from nightlab.research.execution import Executor
from nightlab.research.journal import Experiment, Run
from nightlab.research.live import SilentView
from nightlab.research.state import LoopState
from nightlab.research.workspace import Workspace


class ExperimentWorker:
    """Slot `slot` of run `run` in the workspace at `root`: its worktree made and set up at start."""

    def __init__(self, root: str, run: Run, config: NightlabConfig, sandboxed: bool, slot: int) -> None:
        self.root, self.run, self.slot = Path(root), run, slot
        main = Workspace(self.root, config)
        path = worktrees.create(main, run.tag, slot, run.base_commit, run.preserved)
        gpus = _assigned_gpus()
        if gpus is not None:  # phases get a clean environment: pass on the cards Ray gave this worker
            config.experiment.env["CUDA_VISIBLE_DEVICES"] = gpus
        ws = Workspace(path, config)
        wrap = execution.sandbox_wrap(ws)[2] if sandboxed else execution.unsandboxed
        self.executor = Executor(ws, run, SilentView(), wrap, on_start=self._note_process, log_root=self.root)
        self.executor.setup()

    def ready(self) -> int:
        """The worker's process id, once its worktree is set up (the driver waits for it)."""
        return os.getpid()

    def _note_process(self, pgid: int) -> None:
        worktrees.note_process(self.root, self.run.tag, self.slot, pgid)

    def evaluate(self, state: LoopState, started: Experiment) -> Experiment:
        """Measure the committed candidate `started` against `state`'s best; its record with the decision."""
        judged = measure_candidate(self.executor, state, self.executor.config.decide, started)
        return self.executor.checks(judged) if judged.decision == "keep" else judged


def _assigned_gpus() -> str | None:
    """The GPUs Ray assigned to this actor, as CUDA_VISIBLE_DEVICES wants them; None outside Ray or
    without GPUs."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    ids = ray.get_gpu_ids()
    return ",".join(str(i) for i in ids) if ids else None
