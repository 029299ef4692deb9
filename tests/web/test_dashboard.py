"""The dashboard in a real browser (Playwright driving the system's Chromium) against a real run.

The run has kept, discarded and crashed experiments and one marked as running; the tests read the pages as
a person sees them and follow the links a person would click. One screenshot per page is written to
test-artifacts/screenshots/ (not committed).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from nightlab.research.journal import Experiment, Journal, Pending
from nightlab.research.loop import ResearchLoop, RunOptions
from nightlab.train.api.background import serve_in_thread
from nightlab.web.app import create_dashboard_app
from tests.research.loop_workspace import make_workspace, replace_block

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="install the test extra (playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium")
SHOTS = Path("test-artifacts/screenshots")
HOSTILE = "lower the <b>LR</b> \x1b]52;c;aGk=\x07now"


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    root = make_workspace(
        tmp_path_factory.mktemp("dash"),
        config={"decide": {"baseline_runs": 2}},
        patches={
            "1.md": replace_block("LEARNING_RATE = 0.3", "LEARNING_RATE = 0.05", description=HOSTILE),
            "2.md": replace_block("WIDTH = 4", "WIDTH = 3", description="narrow"),
            "3.md": replace_block(
                "def main() -> None:", "def main() -> None:\n    raise SystemExit(3)", description="crash"
            ),
        },
    )
    ResearchLoop(root, RunOptions(tag="night", proposer="replay")).run_loop()
    journal = Journal.for_workspace(root)
    run = journal.find_run("night")
    for number, what in ((6, "widen a lot"), (7, "on a second worker")):  # two at once, as --workers runs
        running = Experiment(run.id, number, "candidate", description=what, started_at=time.time() - 3)
        journal.mark_pending(Pending(running))
    rows = journal.experiments(run.id)
    journal.close()
    with serve_in_thread(create_dashboard_app(root)) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield server.url, page, rows
        browser.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_run_page_shows_status_numbers_and_every_experiment(dashboard):
    url, page, rows = dashboard
    page.goto(url + "/")  # one run: straight to it
    assert page.url.endswith("/runs/night")
    shot(page, "run")
    assert page.locator("#live .running").nth(0).inner_text().startswith("Running #6: widen a lot,")
    assert page.locator("#live .running").nth(1).inner_text().startswith("Running #7: on a second worker,")
    kept = [r for r in rows if r.kind == "candidate" and r.decision == "keep"]
    assert page.locator("#best").inner_text() == f"{kept[-1].metric:.6g}"
    assert page.locator("#kept").inner_text() == "1" and page.locator("#experiments").inner_text() == "3"
    table = page.locator("table.experiments tbody tr")
    assert table.count() == len(rows)
    decisions = [table.nth(i).locator(".decision").inner_text() for i in range(len(rows))]
    assert decisions == [r.decision for r in rows]
    # The agent's words appear as text: no markup, no escape sequence.
    description = page.locator("tr[data-number='3'] .description").inner_text()
    assert description == "lower the <b>LR</b> now" and page.locator("table b").count() == 0


def test_the_plot_has_a_point_per_measured_run_that_opens_its_page(dashboard):
    url, page, rows = dashboard
    page.goto(url + "/runs/night")
    points = page.locator("svg.progress circle.point")
    assert points.count() == sum(r.metric is not None for r in rows)
    assert page.locator("svg.progress circle.kept").count() == sum(
        r.decision == "keep" and r.metric is not None for r in rows
    )
    page.locator("svg.progress circle[data-number='3']").click()
    page.wait_for_url("**/runs/night/experiments/3")
    assert "keep" in page.locator("h1 .decision").inner_text()


def test_an_experiment_page_shows_its_diff_reason_and_log(dashboard):
    url, page, rows = dashboard
    page.goto(url + "/runs/night/experiments/5")
    shot(page, "experiment")
    crash = next(r for r in rows if r.number == 5)
    assert page.locator("h1 .description").inner_text() == "crash"
    assert "exited with code 3" in crash.reason and crash.reason in page.locator(".reason").inner_text()
    assert "+    raise SystemExit(3)" in page.locator("pre.diff .add").all_inner_texts()
    assert "=== train" in page.locator("pre.log").inner_text()


def test_unknown_runs_and_experiments_are_404_pages(dashboard):
    url, page, _ = dashboard
    response = page.goto(url + "/runs/nope")
    assert response.status == 404 and "no run 'nope'" in page.locator(".error").inner_text()
    assert page.goto(url + "/runs/night/experiments/99").status == 404


def test_the_live_status_follows_the_journal(dashboard):
    url, page, _ = dashboard
    page.goto(url + "/runs/night")
    status = page.evaluate("fetch('/api/runs/night/status').then(r => r.json())")
    assert [r["number"] for r in status["running"]] == [6, 7]
    assert all(r["elapsed_seconds"] >= 3 and r["budget_seconds"] > 0 for r in status["running"])
