"""The training service's errors in one place: what a client got wrong, what the engine refuses or fails on.

Every error a client can fix is a `NightlabError` and keeps its standard-library base, so code that catches
`ValueError` still works. The API layers turn these into answers: `UserError` carries its HTTP status,
`EngineError` its Tinker category, and `OpenAIError` the fields of OpenAI's error body.
"""

from __future__ import annotations

from typing import Literal

from nightlab.errors import NightlabError


class UserError(NightlabError):
    """A request the client got wrong; `status` is the HTTP code when it is answered directly."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class EngineError(NightlabError):
    """A request the engine refuses ("User": the caller can fix it) or fails on ("Server")."""

    def __init__(self, message: str, category: Literal["User", "Server"] = "User") -> None:
        super().__init__(message)
        self.category = category


class LossError(NightlabError, ValueError):
    """A loss request that cannot be computed: unknown name, missing input, bad shape or config."""


class SamplingInputError(NightlabError, ValueError):
    """A sampling request that can never be served (bad token ids, bad parameters): the caller's fault."""


class OpenAIError(Exception):
    """How any failure is answered on the OpenAI `/v1` routes, 4xx or 5xx, so SDKs raise the right class.

    Not a `NightlabError`: it is the shape of an answer, and a 5xx one is the server's fault, not the user's.
    """

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self, kind: str | None = None) -> dict[str, dict[str, str | None]]:
        """OpenAI's {"error": {message, type, param, code}}; `kind` defaults to the one the status implies."""
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}
