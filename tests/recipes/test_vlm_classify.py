"""`nightlab recipe vlm-classify` end to end: scikit-learn's bundled digits as an ImageFolder, a tiny random
Qwen2.5-VL on a real service. The pipeline's outputs are checked, not the random model's skill."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from nightlab.cli import app
from nightlab.recipes.vlm_classify import PLOT_FILE, RESULTS_FILE
from nightlab.train.tiny_vlm import make_tiny_vlm
from tests.recipes.conftest import Service, running_service

runner = CliRunner()
SHOTS = [1, 2, 4, 8]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "vlm")


@pytest.fixture(scope="module")
def vlm_service(tmp_path_factory: pytest.TempPathFactory, vlm: Path) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("serve"), allowed=(vlm,)) as svc:
        yield svc


def digits_folder(root: Path, classes: int, per_class: int) -> Path:
    """The first `per_class` 8x8 digit images of classes 0.. as PNGs, one subdirectory per digit."""
    digits = load_digits()
    for label in range(classes):
        (root / str(label)).mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for i, image in enumerate(images):
            Image.fromarray((image * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i}.png")
    return root


def invoke(service: Service, vlm: Path, images: Path, log_dir: Path):
    return runner.invoke(
        app,
        [
            "recipe",
            "vlm-classify",
            "--images",
            str(images),
            "--model",
            str(vlm),
            "--log-dir",
            str(log_dir),
            "--base-url",
            service.url,
            "--api-key",
            service.api_key,
            "--shots",
            ",".join(map(str, SHOTS)),
            "--test-per-class",
            "2",
            "--image-size",
            "56",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--learning-rate",
            "0.01",
        ],
    )


def test_digits_give_a_table_results_and_a_plot(vlm_service, vlm, tmp_path) -> None:
    images = digits_folder(tmp_path / "digits", classes=3, per_class=10)
    result = invoke(vlm_service, vlm, images, tmp_path / "run")
    assert result.exit_code == 0, result.output
    table = [line.strip("│ ").split() for line in result.output.splitlines() if line.startswith("│")]
    assert [row[0] for row in table] == [str(k) for k in SHOTS], result.output
    assert all(len(row) == 5 and row[2].endswith("%") and row[4].endswith("%") for row in table), (
        result.output
    )
    saved = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert saved["classes"] == ["0", "1", "2"] and saved["test_images"] == 6
    rows = saved["rows"]
    assert sorted((r["shots"], r["method"]) for r in rows) == sorted(
        (k, m) for k in SHOTS for m in ("vlm_lora", "linear_probe")
    )
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    # 6 test images: every accuracy is a whole number of them
    assert all(abs(r["accuracy"] * 6 - round(r["accuracy"] * 6)) < 1e-9 for r in rows)
    assert (tmp_path / "run" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_cannot_hold_the_shots_is_a_clear_error(vlm_service, vlm, tmp_path) -> None:
    one_class = digits_folder(tmp_path / "one", classes=1, per_class=10)
    result = invoke(vlm_service, vlm, one_class, tmp_path / "a")
    assert result.exit_code == 1 and "at least two class subdirectories" in result.output
    few = digits_folder(tmp_path / "few", classes=2, per_class=5)
    result = invoke(vlm_service, vlm, few, tmp_path / "b")
    assert result.exit_code == 1 and "class '0' has 5 images" in result.output
