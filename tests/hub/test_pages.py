"""The hub's pages in a real browser: the workspaces, and each one's leaderboard across machines."""

from __future__ import annotations

import shutil
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
