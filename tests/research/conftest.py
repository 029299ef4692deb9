"""Research tests keep nightlab's data dir (where the offline tokenizer that counts a proposer's memory is
written once) inside the test session's temp dirs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("NIGHTLAB_DATA_DIR", str(tmp_path_factory.mktemp("nightlab-data")))
