"""Make a typer command from a recipe's settings dataclass: one option per field, with the field's type,
default, lower bound, help and environment variable. A list of integers is typed as comma-separated text."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import annotated_types
import typer
from pydantic.fields import FieldInfo


def parse_int_list(text: str) -> list[int]:
    """`16,32,64` as [16, 32, 64]; a usage error names what was expected."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise typer.BadParameter("give at least one integer")
    return values


def _is_int_list(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return (
        typing.get_origin(annotation) is list
        and len(args) == 1
        and typing.get_args(args[0])[:1] in ((), (int,))
    )


def _item_minimum(annotation: Any) -> int:
    """The smallest item a list of `Annotated[int, Gt(n)]` or `Annotated[int, Ge(n)]` allows (else no
    limit)."""
    (item,) = typing.get_args(annotation)
    for m in getattr(item, "__metadata__", ()):
        if isinstance(m, annotated_types.Gt):
            return int(m.gt) + 1
        if isinstance(m, annotated_types.Ge):
            return int(m.ge)
    return -(2**63)


def _cli_type(annotation: Any) -> Any:
    """What typer can parse: literals are taken as text (the settings model checks them), lists as text."""
    if typing.get_origin(annotation) is Literal or _is_int_list(annotation):
        return str
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _cli_type(inner) | None
    return annotation


def _default(info: FieldInfo, cli: dict[str, Any]) -> Any:
    if cli["cli_required"] or (info.is_required() and cli["cli_default"] is None):
        return ...
    if cli["cli_default"] is not None:
        return cli["cli_default"]
    value = info.get_default(call_default_factory=True)
    return ",".join(map(str, value)) if _is_int_list(info.annotation) else value


def _lower_bound(info: FieldInfo) -> float | None:
    return next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)


def options_of(settings: type) -> list[inspect.Parameter]:
    """One keyword-only parameter with a typer.Option per field of a pydantic dataclass."""
    params = []
    for name, info in settings.__pydantic_fields__.items():
        extra = info.json_schema_extra
        cli = extra["cli"] if isinstance(extra, dict) else {}
        cli = {"envvar": None, "flags": [], "cli_default": None, "cli_required": False, **cli}
        annotation = _cli_type(info.annotation)
        bound = None if _is_int_list(info.annotation) else _lower_bound(info)
        option = typer.Option(
            _default(info, cli),
            f"--{name.replace('_', '-')}",
            *cli["flags"],
            envvar=cli["envvar"],
            min=bound,
            help=info.description,
            show_default=not isinstance(_default(info, cli), Path),
        )
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        )
    return params


def settings_from(settings: type, values: dict[str, Any]) -> Any:
    """Build the settings from parsed options: comma-separated lists are split (a usage error if
    malformed)."""
    fields = settings.__pydantic_fields__
    converted = {
        name: parse_int_list(value)
        if _is_int_list(fields[name].annotation) and isinstance(value, str)
        else value
        for name, value in values.items()
        if name in fields
    }
    for name, value in converted.items():
        annotation = fields[name].annotation
        if _is_int_list(annotation) and min(value) < (least := _item_minimum(annotation)):
            raise typer.BadParameter(f"each of --{name.replace('_', '-')} must be >= {least}")
    return settings(**converted)


def add_settings_command(
    app: typer.Typer,
    name: str,
    settings: type,
    run: Callable[..., None],
    *,
    leading: Sequence[inspect.Parameter] = (),
    doc: str,
) -> None:
    """Register `run(**values)` as `name`, its options made from `settings` after the `leading` parameters."""
    params = [*leading, *options_of(settings)]

    def command(**values: Any) -> None:
        run(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name
    app.command(name)(command)
