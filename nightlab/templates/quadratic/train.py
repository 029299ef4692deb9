"""The editable half of the quadratic toy: "training" picks the knob values the harness will score.

The knobs are the UPPER_CASE constants below. The run writes them (and its seed) to run/model.json;
evaluate.py, the harness, turns them into the loss. Changing SEED only moves the noise: nightlab must not
take that for progress.
"""

import json
import os
import time
from pathlib import Path

LEARNING_RATE = 0.3
WIDTH = 4
MOMENTUM = 0.5
SEED = 42


def simulate_training(knobs: dict, seed: int, seconds: float, steps: int = 10) -> None:
    """Sleep `seconds` in `steps`, printing a loss that falls towards what these knobs will score (the
    harness's own loss), so that demos and benchmarks get a realistic duration and a progress curve."""
    from evaluate import loss

    for step in range(steps):
        time.sleep(seconds / steps)
        print(f"step {step} | loss {loss(knobs, seed, 'val') + 10.0 * (1 - step / steps):.4f}", flush=True)


def main() -> None:
    seed = SEED + int(os.environ.get("NIGHTLAB_SEED_OFFSET", "0"))
    knobs = {"LEARNING_RATE": LEARNING_RATE, "WIDTH": WIDTH, "MOMENTUM": MOMENTUM}
    if work := float(os.environ.get("QUADRATIC_WORK_SECONDS", "0")):
        simulate_training(knobs, seed, work)
    out = Path("run")
    out.mkdir(exist_ok=True)
    (out / "model.json").write_text(json.dumps({"knobs": knobs, "seed": seed}))
    print("trained with " + ", ".join(f"{k}={v}" for k, v in knobs.items()) + f" (seed {seed})")


if __name__ == "__main__":
    main()
