"""The dashboard's web app for one workspace: HTML pages, their JSON, and the small script that keeps the
live status current. Bound to loopback by `nightlab dashboard`; it only reads."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, Undefined, select_autoescape

from nightlab.errors import NightlabError
from nightlab.research.journal import JOURNAL_NAME, STATE_DIR, Journal
from nightlab.research.summary import run_json
from nightlab.web import views
from nightlab.web.online import online_page, read_rounds

STATIC = Path(__file__).parent / "static"


class DashboardError(NightlabError, RuntimeError):
    """The dashboard cannot start for this workspace."""


def dashboard_pages() -> Environment:
    """The page templates, HTML-escaping what they show (the dashboard's and the hub's pages)."""
    env = Environment(loader=PackageLoader("nightlab.web", "pages"), autoescape=select_autoescape(["html"]))
    env.filters["num"] = lambda v, digits=6: (
        "-" if v is None or isinstance(v, Undefined) else f"{v:.{digits}g}"
    )
    return env


def create_dashboard_app(root: Path, online: Path | None = None) -> FastAPI:
    """The dashboard of the workspace at `root`, and of an online run's log directory at `/online` when
    `online` is given; the workspace needs a journal unless there is an online run to show instead."""
    root = Path(root).resolve()
    has_runs = (root / STATE_DIR / JOURNAL_NAME).is_file()
    if not has_runs and online is None:
        raise DashboardError(f"{root} has no nightlab journal yet; start with `nightlab run`")
    pages = dashboard_pages()
    app = FastAPI(title="nightlab dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def html(page: str, **data: object) -> HTMLResponse:
        return HTMLResponse(pages.get_template(page).render(workspace_root=str(root), **data))

    @app.exception_handler(NightlabError)
    async def _nightlab_error(_: Request, exc: NightlabError) -> Response:
        page = pages.get_template("error.html").render(workspace_root=str(root), message=str(exc))
        return HTMLResponse(page, status_code=404)

    @app.get("/", response_model=None)
    def index() -> Response:
        if not has_runs:
            return RedirectResponse("/online")
        runs = views.run_list(root)
        if len(runs) == 1:
            return RedirectResponse(f"/runs/{runs[0]['tag']}")
        return html("index.html", runs=runs)

    @app.get("/runs/{tag}", response_class=HTMLResponse)
    def run(tag: str) -> HTMLResponse:
        return html("run.html", **views.run_page(root, tag))

    @app.get("/runs/{tag}/experiments/{number}", response_class=HTMLResponse)
    def experiment(tag: str, number: int) -> HTMLResponse:
        page = views.experiment_page(root, tag, number)
        if page is None:
            raise HTTPException(404, f"run {tag!r} has no experiment #{number}")
        return html("experiment.html", **page)

    @app.get("/api/runs/{tag}")
    def run_document(tag: str) -> Response:
        journal = Journal.for_workspace(root)
        try:
            return Response(run_json(journal, tag), media_type="application/json")
        finally:
            journal.close()

    @app.get("/api/runs/{tag}/status")
    def run_status(tag: str) -> dict:
        return views.status(root, tag)

    if online is not None:
        online_dir = Path(online).resolve()

        @app.get("/online", response_class=HTMLResponse)
        def online_rounds() -> HTMLResponse:
            return html("online.html", **online_page(online_dir))

        @app.get("/api/online")
        def online_rounds_json() -> list[dict]:
            return read_rounds(online_dir)

    return app
