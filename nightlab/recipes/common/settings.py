"""How a recipe declares a setting once: its type, default, bounds and help live on the settings dataclass,
and the CLI's options are made from them (see `cli_options`), so the two can never disagree."""

from __future__ import annotations

from typing import Any

from pydantic import Field

DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"


def setting(
    help: str,
    *,
    ge: float | None = None,
    envvar: str | None = None,
    flags: tuple[str, ...] = (),
    cli_default: Any = None,
    cli_required: bool = False,
) -> Any:
    """A field's help and lower bound, plus what only the command line needs: an environment variable, extra
    flags (`-w`), a default the command line uses where the library has none, or an option the command line
    always asks for."""
    cli = {"envvar": envvar, "flags": list(flags), "cli_default": cli_default, "cli_required": cli_required}
    return Field(description=help, ge=ge, json_schema_extra={"cli": cli})


# The service every recipe talks to, and the base model on it: the same option in every recipe.
SERVICE_URL = setting(
    "The training service (nightlab serve).", envvar="TINKER_BASE_URL", cli_default=DEFAULT_SERVICE_URL
)
SERVICE_KEY = setting("The service's API key (tml-...).", envvar="TINKER_API_KEY")
MODEL_NAME = setting("Base model on the service, as `nightlab models list` prints it.", cli_required=True)
