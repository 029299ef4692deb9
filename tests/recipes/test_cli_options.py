"""A settings model becomes a command: each field an option with its type, default, bounds, help, extras."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import typer
from pydantic import BaseModel, PositiveInt, field_validator
from pydantic import dataclasses as pydantic_dataclasses
from typer.testing import CliRunner

from nightlab.errors import NightlabError
from nightlab.recipes.common.cli_options import SettingsError, add_settings_command, settings_from
from nightlab.recipes.common.settings import setting

runner = CliRunner()


@pydantic_dataclasses.dataclass
class Toy:
    out: Annotated[Path, setting("Where to write.", flags=("-o",))]
    name: Annotated[str, setting("A name.", cli_required=True)] = ""
    url: Annotated[str, setting("A URL.", envvar="TOY_URL", cli_default="http://here")] = "http://lib"
    count: Annotated[int, setting("How many.", ge=1, le=9)] = 3
    above: Annotated[int, setting("More than 2.", gt=2)] = 5
    scale: Annotated[float, setting("Positive.", gt=0)] = 1.5
    note: Annotated[Path | None, setting("An optional file.")] = None
    mode: Annotated[Literal["a", "b"], setting("a or b.")] = "a"
    fast: Annotated[bool, setting("Go fast.")] = True
    sizes: Annotated[list[PositiveInt], setting("Sizes, comma-separated.")] = field(
        default_factory=lambda: [1, 2]
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _known_mode(cls, value: object) -> object:
        if value not in ("a", "b"):
            raise ValueError(f"mode must be a or b, not {value!r}")
        return value


def toy_app(seen: list[Any], settings: type = Toy) -> typer.Typer:
    app = typer.Typer()

    def run(**values: Any) -> None:
        try:
            seen.append(settings_from(settings, values))
        except SettingsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    add_settings_command(app, "toy", settings, run, doc="A toy.")
    return app


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, Any]:
    seen: list[Any] = []
    result = runner.invoke(toy_app(seen), ["-o", "x", "--name", "n", *args], env=env)
    return result.exit_code, result.output, seen[0] if seen else None


def test_defaults_come_from_the_model_and_the_command_line_extras() -> None:
    code, output, toy = invoke()
    assert code == 0, output
    assert toy == Toy(Path("x"), name="n", url="http://here", sizes=[1, 2])


def test_every_kind_of_value_reaches_the_model(tmp_path) -> None:
    code, output, toy = invoke(
        "--count", "9", "--above", "3", "--scale", "0.1", "--note", str(tmp_path), "--mode", "b",
        "--no-fast", "--sizes", "4, 8,16",
        env={"TOY_URL": "http://env"},
    )  # fmt: skip
    assert code == 0, output
    assert (toy.count, toy.above, toy.scale, toy.note, toy.mode, toy.fast, toy.sizes, toy.url) == (
        9, 3, 0.1, tmp_path, "b", False, [4, 8, 16], "http://env",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "--count"),
        (["--count", "10"], "--count"),
        (["--above", "2"], "--above"),
        (["--scale", "0"], "greater than 0"),
        (["--sizes", "4,x"], "comma-separated integers"),
        (["--sizes", ","], "at least one integer"),
        (["--sizes", "4,0"], "greater than 0"),
        (["--fast", "no"], "no"),
    ],
)
def test_a_bad_value_is_a_usage_error(args: list[str], message: str) -> None:
    code, output, toy = invoke(*args)
    assert code == 2 and message in output and toy is None, output


def test_required_options_are_asked_for() -> None:
    result = runner.invoke(toy_app([]), ["-o", "x"])
    assert result.exit_code == 2 and "--name" in result.output


def test_a_value_the_model_refuses_names_the_option() -> None:
    code, output, _ = invoke("--mode", "c")
    assert code == 1 and "--mode: mode must be a or b, not 'c'" in output
    assert issubclass(SettingsError, NightlabError) and issubclass(SettingsError, ValueError)


def test_help_shows_the_fields_help_bounds_and_env_var() -> None:
    result = runner.invoke(toy_app([]), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("Where to write.", "-o", "1<=x<=9", "x>=3", "TOY_URL", "--no-fast", "[default: 1,2]"):
        assert text in result.output, text


def test_a_plain_pydantic_model_works_too() -> None:
    class Plain(BaseModel):
        steps: int = 2
        rate: Annotated[float, setting("A rate.", ge=0)] = 0.5

    seen: list[Any] = []
    result = runner.invoke(toy_app(seen, Plain), ["--steps", "4"])
    assert result.exit_code == 0, result.output
    assert seen == [Plain(steps=4, rate=0.5)]


def test_a_field_with_no_command_line_form_is_refused_when_the_command_is_made() -> None:
    class Nested(BaseModel):
        names: list[str] = []

    with pytest.raises(TypeError, match="--names"):
        toy_app([], Nested)
