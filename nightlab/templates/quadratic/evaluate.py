"""The harness of the quadratic toy: score the knobs train.py chose, with seeded measurement noise.

loss = sum(((knob - optimum) / scale)^2) + NOISE * N(0, 1), the noise drawn from the run's seed (validation)
or from another stream (the held-out test split). The result is printed as one line signed with the key the
loop passes in NIGHTLAB_METRIC_KEY (taken out of the environment first, see `nightlab.harness`), plus a
human-readable `loss: x` line that nightlab only logs.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

from nightlab.harness import read_key, reexec_without_key, sign_metrics

OPTIMUM = {"LEARNING_RATE": 0.05, "WIDTH": 16.0, "MOMENTUM": 0.9}
SCALE = {"LEARNING_RATE": 0.1, "WIDTH": 8.0, "MOMENTUM": 0.2}
NOISE = 0.01
TEST_STREAM = 1_000_003


def loss(knobs: dict, seed: int, split: str) -> float:
    rng = random.Random(seed + (TEST_STREAM if split == "test" else 0))
    bowl = sum(((float(knobs[k]) - OPTIMUM[k]) / SCALE[k]) ** 2 for k in OPTIMUM)
    return bowl + NOISE * rng.gauss(0.0, 1.0)


def main() -> int:
    reexec_without_key()
    key = read_key()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=["val", "test"], default="val")
    args = parser.parse_args()
    try:
        model = json.loads(Path("run/model.json").read_text())
        value = loss(model["knobs"], int(model["seed"]), args.split)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"FAIL: cannot score run/model.json: {exc}")
        return 1
    if not math.isfinite(value):
        print(f"FAIL: loss is {value}")
        return 1
    print(f"loss: {value:.6f}")
    if key:
        print(sign_metrics({"loss": value}, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
