"""The hub's pages in a real browser: the workspaces, and each one's leaderboard across machines."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.hub.test_server import IDENTITY, _result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="install the test extra (playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium")
SHOTS = Path("test-artifacts/screenshots")


def test_the_leaderboard_page_ranks_machines_on_the_normalised_scale(hub, clients):
    alice, bob = clients
    alice.post_result(_result("a" * 40, None, 10.0, machine="fast", calibration=2.0))
    bob.post_result(_result("b" * 40, None, 12.0, machine="slow", calibration=1.0))
    hostile = _result("c" * 40, "b" * 40, 11.0, machine="slow", calibration=1.0)
    bob.post_result(hostile | {"description": "<script>alert(1)</script>", "decision": "discard"})
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(hub.url + "/")
        page.locator(f"a[href='/workspaces/{IDENTITY}']").click()
        page.wait_for_url(f"**/workspaces/{IDENTITY}")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "hub-leaderboard.png"), full_page=True)
        rows = page.locator("table.leaderboard tbody tr")
        machines = [rows.nth(i).locator(".machine").inner_text() for i in range(rows.count())]
        normalised = [rows.nth(i).locator(".normalised").inner_text() for i in range(rows.count())]
        assert machines == ["slow", "fast"] and normalised == ["12", "20"]  # the discard is not on the board
        assert page.locator("script").count() == 0
        browser.close()


def _beat(machine: str, tag: str, running: list[dict], finished: bool = False) -> dict:
    base = _result(None, None, None, machine=machine)
    return {
        "workspace": base["workspace"],
        "machine": base["machine"],
        "tag": tag,
        "budget_seconds": 60,
        "running": running,
        "finished": finished,
    }


def test_the_workspace_page_shows_each_runs_live_status(hub, clients):
    alice, bob = clients
    widen = {"number": 7, "description": "widen <b>the</b> MLP", "started_at": time.time() - 30}
    deeper = {"number": 8, "description": "deeper", "started_at": time.time() - 5}
    alice.post_live(_beat("fast", "night", [widen, deeper]))
    bob.post_live(_beat("slow", "sunday", [], finished=True))
    runs = {run["tag"]: run for run in alice.live(IDENTITY)}
    assert [r["number"] for r in runs["night"]["running"]] == [7, 8] and runs["sunday"]["finished"]
    assert runs["night"]["user"] == "alice" and runs["night"]["silent_seconds"] < 60
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{hub.url}/workspaces/{IDENTITY}")
        page.screenshot(path=str(SHOTS / "hub-live.png"), full_page=True)
        night = page.locator("table.live tr[data-tag='night'] .running")
        assert night.count() == 2
        first = night.nth(0).inner_text()
        assert first.startswith("#7 widen <b>the</b> MLP: ") and first.endswith("s of a 60 s budget")
        assert 29 <= float(first.split(": ")[1].split(" s")[0]) < 90
        assert page.locator("table.live tr[data-tag='sunday'] .now").inner_text() == "finished"
        browser.close()
