"""How a recipe declares a setting once: its type, default, bounds and help live on the recipe's settings
model, and `cli_options` makes the command line from them, so the library and the CLI can never disagree.

What only the command line needs (an environment variable, a short flag, a default where the library has none,
an option it always asks for) rides on the same field, in `CommandLine`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field
from pydantic.fields import FieldInfo

DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"
_EXTRA_KEY = "command_line"


@dataclass(frozen=True)
class CommandLine:
    """A field's command-line extras. `default` (when not None) replaces the library's default on the command
    line; `required` makes the command line ask for a field the library can leave at its default."""

    envvar: str | None = None
    flags: tuple[str, ...] = ()
    default: Any = None
    required: bool = False


def setting(
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    envvar: str | None = None,
    flags: tuple[str, ...] = (),
    cli_default: Any = None,
    cli_required: bool = False,
) -> Any:
    """A field's help and bounds, plus its command-line extras (see `CommandLine`): use it as
    `name: Annotated[int, setting("What it does.", ge=1)] = 4`."""
    extras = CommandLine(envvar, tuple(flags), cli_default, cli_required)
    return Field(description=help, ge=ge, gt=gt, le=le, json_schema_extra={_EXTRA_KEY: asdict(extras)})


def command_line(info: FieldInfo) -> CommandLine:
    """The command-line extras `setting` stored on a field (none for a plain pydantic field)."""
    extra = info.json_schema_extra
    stored = extra.get(_EXTRA_KEY) if isinstance(extra, dict) else None
    if not isinstance(stored, dict):
        return CommandLine()
    return CommandLine(**stored)


# The service every recipe talks to, and the base model on it: the same option in every recipe.
SERVICE_URL = setting(
    "The training service (nightlab serve).", envvar="TINKER_BASE_URL", cli_default=DEFAULT_SERVICE_URL
)
SERVICE_KEY = setting("The service's API key (tml-...).", envvar="TINKER_API_KEY")
MODEL_NAME = setting("Base model on the service, as `nightlab models list` prints it.", cli_required=True)
