"""What the hub is told: a workspace's identity, this machine, and one experiment, as the API's JSON bodies.

The identity is a hash of the harness files and the metric name: two workspaces share results only when they
measure the same thing the same way, whatever their editable code or directory name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from nightlab.hub.calibration import Calibration
from nightlab.research.journal import Experiment
from nightlab.research.workspace import Workspace


def workspace_record(workspace: Workspace) -> dict[str, str]:
    metric = workspace.config.metric
    harness = json.dumps(workspace.harness_hashes(), sort_keys=True)
    identity = hashlib.sha256(f"{harness}|{metric.name}".encode()).hexdigest()
    return {
        "identity": identity,
        "name": workspace.config.workspace.name,
        "metric": metric.name,
        "goal": metric.goal,
    }


def machine_record(calibration: Calibration) -> dict[str, Any]:
    return {
        "id": calibration.machine_id,
        "accelerator": calibration.accelerator,
        "memory_gb": calibration.memory_gb,
        "calibration": calibration.score,
    }


def result_record(
    experiment: Experiment, workspace: dict[str, str], machine: dict[str, Any]
) -> dict[str, Any]:
    return {
        "workspace": workspace,
        "machine": machine,
        "commit": experiment.commit_sha,
        "parent": experiment.parent_commit,
        "description": experiment.description[:2000],
        "decision": experiment.decision,
        "metric": experiment.metric,
        "sigmas": experiment.sigmas,
        "noise": experiment.noise,
    }
