"""The service's errors: user-fixable ones share nightlab's base and keep their stdlib one; bodies stay apart
from the routers that use them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nightlab.train.api as api_package
from nightlab.errors import NightlabError
from nightlab.train.errors import EngineError, LossError, OpenAIError, SamplingInputError, UserError

ROUTERS = {"nightlab.train.api.app", "nightlab.train.api.openai", "nightlab.train.api.tinker"}


@pytest.mark.parametrize(
    ("error", "stdlib_base"),
    [
        (UserError("bad seq_id", 409), Exception),
        (EngineError("unknown model_id"), Exception),
        (LossError("unknown loss_fn"), ValueError),
        (SamplingInputError("prompt is empty"), ValueError),
    ],
)
def test_client_errors_are_nightlab_errors_and_keep_their_stdlib_base(error, stdlib_base):
    assert isinstance(error, NightlabError) and isinstance(error, stdlib_base)


def test_user_and_engine_errors_carry_how_they_are_answered():
    assert UserError("gone", 410).status == 410 and UserError("bad").status == 400
    assert EngineError("refused").category == "User"
    assert EngineError("out of memory", "Server").category == "Server"


def test_openai_error_body_has_openais_shape():
    refused = OpenAIError(400, "stop sequences must be non-empty strings", param="stop")
    assert refused.body() == {
        "error": {
            "message": "stop sequences must be non-empty strings",
            "type": "invalid_request_error",
            "param": "stop",
            "code": None,
        }
    }
    failed = OpenAIError(500, "internal error", code="oops")
    assert failed.body()["error"]["type"] == "server_error"
    assert refused.body("server_error")["error"]["type"] == "server_error"  # a stream's late failure
    assert not isinstance(failed, NightlabError)  # a 5xx answer is not the user's to fix


@pytest.mark.parametrize("module", ["bodies.py", "openai_bodies.py"])
def test_body_modules_import_no_router(module):
    tree = ast.parse((Path(api_package.__file__).parent / module).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert not imported & ROUTERS
