"""`nightlab hub ...`: serve a hub, give users tokens, pull what other machines found.

Only typer is imported here; the server, database and HTTP client load inside the command that needs them,
so `nightlab --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nightlab.console import fail
from nightlab.errors import NightlabError

DEFAULT_DB = "sqlite:///nightlab-hub.db"
TOKEN_ENV = "NIGHTLAB_HUB_TOKEN"

hub_app = typer.Typer(
    help="Share results across machines: serve a hub, make tokens, pull.", no_args_is_help=True
)
token_app = typer.Typer(help="Per-user tokens: a token is needed to post, and to read on a private hub.")
hub_app.add_typer(token_app, name="token")

WORKSPACE_OPTION = typer.Option(Path("."), "--workspace", "-C", help="The workspace directory.")
DB_OPTION = typer.Option(DEFAULT_DB, "--db", help="SQLAlchemy URL: a sqlite:/// file or a PostgreSQL URL.")


@hub_app.command("serve")
def serve(
    db: str = DB_OPTION,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every machine)."),
    port: int = typer.Option(8700, help="TCP port."),
    public_reads: bool = typer.Option(
        True, "--public-reads/--token-reads", help="Whether reading results needs a token too."
    ),
    max_bundle_mb: float = typer.Option(50.0, min=0, help="Largest git bundle a client may push."),
) -> None:
    """Serve the hub: machines post every experiment and push kept commits; anyone allowed reads them."""
    import uvicorn

    from nightlab.hub.server import HubSettings, create_hub_app

    settings = HubSettings(db_url=db, public_reads=public_reads, max_bundle_bytes=int(max_bundle_mb * 2**20))
    uvicorn.run(create_hub_app(settings), host=host, port=port)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="The user the token is for (a new token replaces the old).")],
    db: str = DB_OPTION,
) -> None:
    """Make a token for NAME and print it once: the hub keeps only its hash."""
    from nightlab.hub.db import create_token, open_database

    typer.echo(create_token(open_database(db), name))


@hub_app.command("pull")
def pull(
    url: Annotated[str, typer.Argument(help="The hub, e.g. http://lab-hub:8700.")],
    workspace: Path = WORKSPACE_OPTION,
    token: str | None = typer.Option(None, envvar=TOKEN_ENV, help="Token, for a hub with token-only reads."),
) -> None:
    """Show this workspace's results from every machine and fetch the frontier's commits as refs/hub/<sha>."""
    from nightlab.hub.pull import pull_frontier

    try:
        lines = pull_frontier(url, workspace.resolve(), token)
    except NightlabError as exc:
        fail(exc)
    for line in lines:
        typer.echo(line)
