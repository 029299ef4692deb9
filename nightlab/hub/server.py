"""The hub's HTTP API: machines post every experiment and push kept commits as git bundles; anyone allowed
to read asks for a workspace's results, its frontier, a commit's children, or the per-machine leaderboard.

Writes always need a Bearer token; reads need one only when the hub is not set to public reads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from nightlab.hub import db, live
from nightlab.hub.calibration import normalise
from nightlab.web.app import STATIC, dashboard_pages

COMMIT = r"^[0-9a-f]{7,64}$"
KEPT = "keep"


@dataclass(frozen=True)
class HubSettings:
    db_url: str = "sqlite:///nightlab-hub.db"
    public_reads: bool = True
    max_bundle_bytes: int = 50 * 2**20


class WorkspaceIn(BaseModel):
    identity: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    name: str = Field(max_length=200)
    metric: str = Field(max_length=200)
    goal: Literal["minimize", "maximize"]


class MachineIn(BaseModel):
    id: str = Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")
    accelerator: str = Field(max_length=200)
    memory_gb: float = Field(ge=0)
    calibration: float = Field(gt=0)


class ResultIn(BaseModel):
    workspace: WorkspaceIn
    machine: MachineIn
    commit: str | None = Field(default=None, pattern=COMMIT)  # None: the change never became a commit
    parent: str | None = Field(default=None, pattern=COMMIT)
    description: str = Field(default="", max_length=2000)
    decision: str = Field(max_length=32)
    metric: float | None = None
    sigmas: float | None = None
    noise: float | None = None


class HeartbeatIn(live.LiveIn):
    workspace: WorkspaceIn
    machine: MachineIn


class ResultOut(BaseModel):
    id: int
    user: str
    machine: MachineIn
    commit: str | None
    parent: str | None
    description: str
    decision: str
    metric: float | None
    normalised: float | None
    sigmas: float | None
    noise: float | None
    posted: datetime


_bearer = HTTPBearer(auto_error=False)


def _session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


Db = Annotated[Session, Depends(_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _authenticate(s: Session, credentials: HTTPAuthorizationCredentials | None) -> db.User:
    if credentials is None:
        raise HTTPException(401, "a token is needed: pass `Authorization: Bearer <token>`")
    user = db.user_for_token(s, credentials.credentials)
    if user is None:
        raise HTTPException(403, "this token is not known to the hub: ask its admin for a new one")
    return user


def _writer(s: Db, credentials: Credentials) -> db.User:
    return _authenticate(s, credentials)


def _reader(request: Request, s: Db, credentials: Credentials) -> None:
    if not request.app.state.settings.public_reads:
        _authenticate(s, credentials)


Writer = Annotated[db.User, Depends(_writer)]
Reader = Annotated[None, Depends(_reader)]


def create_hub_app(settings: HubSettings, engine: Engine | None = None) -> FastAPI:
    """The hub as an ASGI app over `settings.db_url` (or an engine already open on it)."""
    app = FastAPI(title="nightlab hub")
    pages = dashboard_pages()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.settings = settings
    app.state.engine = engine or db.open_database(settings.db_url)

    def workspace_or_404(s: Session, identity: str) -> db.Workspace:
        found = s.get(db.Workspace, identity)
        if found is None:
            raise HTTPException(404, f"no results for workspace {identity}")
        return found

    def out(s: Session, ws: db.Workspace, row: db.Result) -> ResultOut:
        machine = s.get(db.Machine, row.machine)
        user = s.get(db.User, row.user)
        value = None if row.metric is None else normalise(ws.metric, row.metric, machine.calibration)
        return ResultOut(
            id=row.id,
            user=user.name,
            machine=MachineIn(
                id=machine.id,
                accelerator=machine.accelerator,
                memory_gb=machine.memory_gb,
                calibration=machine.calibration,
            ),
            commit=row.commit,
            parent=row.parent,
            description=row.description,
            decision=row.decision,
            metric=row.metric,
            normalised=value,
            sigmas=row.sigmas,
            noise=row.noise,
            posted=row.posted,
        )

    def rows(s: Session, identity: str) -> list[db.Result]:
        return list(
            s.scalars(select(db.Result).where(db.Result.workspace == identity).order_by(db.Result.id))
        )

    @app.post("/api/results", status_code=201)
    def post_result(body: ResultIn, s: Db, user: Writer) -> dict[str, int]:
        s.merge(db.Workspace(**body.workspace.model_dump()))
        s.merge(db.Machine(**body.machine.model_dump()))
        row = db.Result(
            workspace=body.workspace.identity,
            machine=body.machine.id,
            user=user.id,
            **body.model_dump(exclude={"workspace", "machine"}),
        )
        s.add(row)
        s.commit()
        return {"id": row.id}

    @app.post("/api/live", status_code=204)
    def post_live(body: HeartbeatIn, s: Db, user: Writer) -> Response:
        """A run's heartbeat: what it is running now."""
        s.merge(db.Workspace(**body.workspace.model_dump()))
        s.merge(db.Machine(**body.machine.model_dump()))
        live.store(s, user, body.workspace.identity, body.machine.id, body)
        return Response(status_code=204)

    @app.get("/api/workspaces/{identity}/live")
    def live_status(identity: str, s: Db, _: Reader) -> list[live.LiveOut]:
        """Every run's last heartbeat on the workspace, the latest first."""
        workspace_or_404(s, identity)
        return live.live_runs(s, identity)

    @app.post("/api/bundles/{commit}", status_code=201)
    async def post_bundle(commit: str, request: Request, s: Db, user: Writer) -> dict[str, int]:
        _check_commit(commit)
        data = await _read_limited(request, settings.max_bundle_bytes)
        if not data.startswith(b"# v2 git bundle") and not data.startswith(b"# v3 git bundle"):
            raise HTTPException(422, "the body is not a git bundle (`git bundle create` makes one)")
        s.merge(db.Bundle(commit=commit, data=data, user=user.id))
        s.commit()
        return {"bytes": len(data)}

    @app.get("/api/bundles/{commit}")
    def get_bundle(commit: str, s: Db, _: Reader) -> Response:
        _check_commit(commit)
        bundle = s.get(db.Bundle, commit)
        if bundle is None:
            raise HTTPException(404, f"no bundle for commit {commit}")
        return Response(bundle.data, media_type="application/octet-stream")

    @app.get("/api/workspaces/{identity}/results")
    def results(identity: str, s: Db, _: Reader) -> list[ResultOut]:
        ws = workspace_or_404(s, identity)
        return [out(s, ws, row) for row in rows(s, identity)]

    @app.get("/api/workspaces/{identity}/frontier")
    def frontier(identity: str, s: Db, _: Reader) -> list[ResultOut]:
        """The leaves: kept commits nobody has kept anything on top of yet."""
        ws = workspace_or_404(s, identity)
        kept = [row for row in rows(s, identity) if row.decision == KEPT]
        parents = {row.parent for row in kept}
        return [out(s, ws, row) for row in kept if row.commit not in parents]

    def board(s: Session, ws: db.Workspace) -> list[ResultOut]:
        """Each machine's best kept result on the normalised scale, best first."""
        identity = ws.identity
        sign = 1 if ws.goal == "minimize" else -1
        best: dict[str, ResultOut] = {}
        for row in rows(s, identity):
            if row.decision != KEPT or row.metric is None:
                continue
            item = out(s, ws, row)
            current = best.get(row.machine)
            if current is None or sign * item.normalised < sign * current.normalised:
                best[row.machine] = item
        return sorted(best.values(), key=lambda item: sign * item.normalised)

    @app.get("/api/workspaces/{identity}/leaderboard")
    def leaderboard(identity: str, s: Db, _: Reader) -> list[ResultOut]:
        """Each machine's best kept result on the normalised scale, best first."""
        return board(s, workspace_or_404(s, identity))

    @app.get("/", response_class=HTMLResponse)
    def index(s: Db, _: Reader) -> HTMLResponse:
        workspaces = list(s.scalars(select(db.Workspace).order_by(db.Workspace.name)))
        page = pages.get_template("hub.html")
        return HTMLResponse(page.render(workspace_root="hub", workspaces=workspaces))

    @app.get("/workspaces/{identity}", response_class=HTMLResponse)
    def workspace_page(identity: str, s: Db, _: Reader) -> HTMLResponse:
        ws = workspace_or_404(s, identity)
        page = pages.get_template("leaderboard.html")
        heard = {"runs": live.live_runs(s, identity), "now": time.time(), "silent": live.SILENT_SECONDS}
        return HTMLResponse(page.render(workspace_root="hub", ws=ws, board=board(s, ws), **heard))

    @app.get("/api/commits/{commit}/children")
    def children(commit: str, s: Db, _: Reader) -> list[ResultOut]:
        """Everything tried on top of `commit`, on any machine, kept or not."""
        _check_commit(commit)
        found = s.scalars(select(db.Result).where(db.Result.parent == commit).order_by(db.Result.id))
        return [out(s, s.get(db.Workspace, row.workspace), row) for row in found]

    return app


def _check_commit(commit: str) -> None:
    if not re.match(COMMIT, commit):
        raise HTTPException(422, f"{commit!r} is not a commit id (7 to 64 lowercase hex digits)")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (checked while streaming, not after)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the bundle is {declared} bytes; this hub takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the bundle passes this hub's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
