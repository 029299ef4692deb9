"""Make a typer command from a recipe's settings model (a pydantic dataclass or BaseModel): one option per
field, with the field's type, default, bounds, description as help, and the environment variable and extra
flags of its `CommandLine` extras, so a setting is added, renamed or documented in one place.

Options take `str`, `int`, `float`, `bool` (an `--x/--no-x` pair), `Path`, any of these or `None`, a literal
of strings (checked by the model, whose message reaches the user) and a list of integers written
comma-separated (`16,32,64`). A value outside a bound is a usage error, as with any typer option; a value the
model's own validators refuse becomes one `SettingsError` line naming the option.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
import typer
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from nightlab.errors import NightlabError
from nightlab.recipes.common.settings import CommandLine, command_line

SCALARS = (str, int, float, bool, Path)
Settings = TypeVar("Settings")


class SettingsError(NightlabError, ValueError):
    """The settings model refused a value; the message names each option and says why."""


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """`X | None` as (X, True); any other annotation as (annotation, False)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _is_int_list(annotation: Any) -> bool:
    """`list[int]`, also with constrained items (`list[PositiveInt]`)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is not list or len(args) != 1:
        return False
    item = args[0]
    return (typing.get_args(item)[0] if typing.get_origin(item) is Annotated else item) is int


def _is_text_literal(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in args)


def _option_type(name: str, annotation: Any) -> Any:
    """What typer parses for a field: lists and literals arrive as text, the rest as themselves."""
    inner, optional = _without_none(annotation)
    if _is_int_list(inner) or _is_text_literal(inner):
        inner = str
    elif inner not in SCALARS:
        raise TypeError(f"{option_name(name)}: no command-line form for {annotation!r}")
    return inner | None if optional else inner


def _bounds(info: FieldInfo, kind: Any) -> dict[str, Any]:
    """typer's min/max from the field's bounds; an integer's open bound is the next integer inside it."""
    bounds: dict[str, Any] = {}
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            bounds["min"] = m.ge
        elif isinstance(m, annotated_types.Le):
            bounds["max"] = m.le
        elif isinstance(m, annotated_types.Gt) and kind is int:
            bounds["min"] = m.gt + 1
        elif isinstance(m, annotated_types.Lt) and kind is int:
            bounds["max"] = m.lt - 1
    return bounds


def _checked(adapter: TypeAdapter, value: Any) -> Any:
    """`value` as the field's own type and constraints accept it; a refusal is a usage error."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise typer.BadParameter(f"{error['input']}: {error['msg']}") from None


def _int_list_parser(adapter: TypeAdapter) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
        if not values:
            raise typer.BadParameter("give at least one integer")
        return _checked(adapter, values)

    return parse


def _open_bounds_check(adapter: TypeAdapter) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        return None if value is None else _checked(adapter, value)

    return check


def _callback(info: FieldInfo, kind: Any) -> Callable[..., Any] | None:
    """What typer's own parsing leaves to check: the items of a list, a float's open bounds."""
    is_list = _is_int_list(kind)
    open_float = kind is float and any(
        isinstance(m, annotated_types.Gt | annotated_types.Lt) for m in info.metadata
    )
    if not (is_list or open_float):
        return None
    constrained = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    adapter = TypeAdapter(constrained)
    return _int_list_parser(adapter) if is_list else _open_bounds_check(adapter)


def _default(info: FieldInfo, extras: CommandLine) -> Any:
    if extras.required:
        return ...
    if extras.default is not None:
        return extras.default
    if info.is_required():
        return ...
    value = info.get_default(call_default_factory=True)
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _option(name: str, info: FieldInfo) -> inspect.Parameter:
    extras = command_line(info)
    kind, _ = _without_none(info.annotation)
    flag = option_name(name)
    declarations = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, *extras.flags]
    option = typer.Option(
        _default(info, extras),
        *declarations,
        envvar=extras.envvar,
        help=info.description,
        callback=_callback(info, kind),
        **_bounds(info, kind),
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_option_type(name, info.annotation)
    )


def options_of(settings: type) -> list[inspect.Parameter]:
    """One keyword-only parameter with a typer.Option per field of a pydantic model or dataclass, the
    required ones first."""
    params = [_option(name, info) for name, info in settings.__pydantic_fields__.items()]
    return sorted(params, key=lambda p: p.default.default is not ...)


def settings_from(settings: type[Settings], values: dict[str, Any]) -> Settings:
    """The settings built from a command's parsed options (other values are left out)."""
    fields = settings.__pydantic_fields__
    try:
        return settings(**{name: value for name, value in values.items() if name in fields})
    except ValidationError as exc:
        raise SettingsError("; ".join(_refusal(error) for error in exc.errors())) from exc


def _refusal(error: Any) -> str:
    reason = error.get("ctx", {}).get("error") or error["msg"]
    return f"{option_name(str(error['loc'][0]))}: {reason}" if error["loc"] else str(reason)


def add_settings_command(
    app: typer.Typer,
    name: str,
    settings: type,
    run: Callable[..., None],
    *,
    leading: Sequence[inspect.Parameter] = (),
    doc: str,
) -> None:
    """Register `name` on `app`, calling `run(**values)`: the `leading` parameters, then one option per
    setting."""
    params = [*leading, *options_of(settings)]

    def command(**values: Any) -> None:
        run(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    app.command(name)(command)
