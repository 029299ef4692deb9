"""The `nightlab` command: every user-facing entry point, each a thin wrapper over a module that does the work."""

from __future__ import annotations

import typer

from nightlab import __version__

app = typer.Typer(
    name="nightlab",
    help="A research lab that keeps working while you sleep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nightlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """nightlab: run experiments all night (`run`), fine-tune open models on your hardware (`serve`)."""


# --- research loop commands: init, run, status, report ---


# --- training service commands: serve, models ---


if __name__ == "__main__":
    app()
