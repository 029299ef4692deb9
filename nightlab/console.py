"""How every command ends on an error the user can fix: one red line on stderr, exit code 1, no traceback."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(exc: BaseException) -> NoReturn:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(exc)))
    raise typer.Exit(1)
