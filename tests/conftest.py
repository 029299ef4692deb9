"""Shared test setup: keep torch to the machine's cores and every cache inside the test's temp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
