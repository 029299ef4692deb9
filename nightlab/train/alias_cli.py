"""`nightlab alias`: move, list and roll back the training service's served aliases from a shell.

The commands talk to a running `nightlab serve` over its `/v1/aliases` routes, so a promotion or a rollback
is the same one atomic move whoever makes it (the online loop or a person at 3 a.m.).
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

alias_app = typer.Typer(help="Served aliases (a stable /v1 model name): set, list, rollback.")
Url = Annotated[str, typer.Option("--url", help="The training service.")]
Key = Annotated[str | None, typer.Option("--api-key", envvar="TINKER_API_KEY", help="The service's API key.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(url: str, key: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    where = f"{url.rstrip('/')}/v1{path}"
    try:
        response = httpx.request(method, where, json=body, headers=headers, timeout=30)
    except httpx.TransportError as exc:
        typer.echo(f"error: no training service answers at {url} ({exc}); start `nightlab serve`", err=True)
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        typer.echo(f"error: {response.status_code}: {message}", err=True)
        raise typer.Exit(1)
    return response.json()


def _line(card: dict[str, Any]) -> str:
    return f"{card['name']} -> {card['model']}  ({card['kind']}: {card['reason']})"


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="The alias, e.g. assistant-latest.")],
    model: Annotated[str, typer.Argument(help="A served base model or a tinker:// sampler checkpoint.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the alias's history.")] = "set from the shell",
    url: Url = DEFAULT_URL,
    api_key: Key = None,
) -> None:
    """Point NAME at MODEL from the next request on."""
    typer.echo(_line(_call(url, api_key, "PUT", f"/aliases/{name}", {"model": model, "reason": reason})))


@alias_app.command("rollback")
def alias_rollback(
    name: Annotated[str, typer.Argument(help="The alias.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the alias's history.")] = "",
    url: Url = DEFAULT_URL,
    api_key: Key = None,
) -> None:
    """Undo NAME's latest promotion: back to the model it served before."""
    typer.echo(_line(_call(url, api_key, "POST", f"/aliases/{name}/rollback", {"reason": reason})))


@alias_app.command("list")
def alias_list(url: Url = DEFAULT_URL, api_key: Key = None) -> None:
    """Every alias of this key and what it serves now."""
    for card in _call(url, api_key, "GET", "/aliases")["data"]:
        typer.echo(_line(card))


@alias_app.command("history")
def alias_history(
    name: Annotated[str, typer.Argument(help="The alias.")], url: Url = DEFAULT_URL, api_key: Key = None
) -> None:
    """NAME's moves, the latest first."""
    for card in _call(url, api_key, "GET", f"/aliases/{name}")["history"]:
        typer.echo(_line(card))
