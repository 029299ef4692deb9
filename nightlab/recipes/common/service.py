"""Connect to the training service with a fast, clear failure when nothing answers at its URL.

`with connect(url, key) as service:` closes the session with the block's outcome (success, errored or
interrupted), as the tinker SDK's own context manager does.
"""

from __future__ import annotations

import httpx
import tinker

from nightlab.errors import NightlabError


class ServiceUnreachable(NightlabError):
    """Nothing answers at the service URL; the message says how to start it."""


def unreachable_message(base_url: str, exc: BaseException) -> str:
    return (
        f"cannot reach the training service at {base_url} ({exc}); start it with `nightlab serve` "
        "(or pass --base-url where it runs)"
    )


def connect(base_url: str, api_key: str | None, timeout_s: float = 10.0) -> tinker.ServiceClient:
    """A ServiceClient, after checking that the service answers (the SDK retries a dead address for
    minutes)."""
    try:
        httpx.get(f"{base_url.rstrip('/')}/api/v1/healthz", timeout=timeout_s)
    except httpx.TransportError as exc:
        raise ServiceUnreachable(unreachable_message(base_url, exc)) from exc
    return tinker.ServiceClient(base_url=base_url, api_key=api_key)
