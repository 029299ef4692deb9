"""The hub's HTTP client, used by the loop (posting results and bundles) and by `nightlab hub pull`."""

from __future__ import annotations

from typing import Any

import httpx

from nightlab.errors import NightlabError


class HubError(NightlabError, RuntimeError):
    """The hub refused a request (a bad token, an unknown workspace) or could not be reached."""


class HubClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A refusal becomes a HubError naming the hub's reason; transport errors pass through, so the loop
        can tell a hub that is down (retry later) from one that said no."""
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise HubError(f"hub {self.url} answered {response.status_code} to {method} {path}: {detail}")
        return response

    def post_result(self, result: dict[str, Any]) -> int:
        return self._request("POST", "/api/results", json=result).json()["id"]

    def post_live(self, heartbeat: dict[str, Any]) -> None:
        self._request("POST", "/api/live", json=heartbeat)

    def live(self, identity: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/workspaces/{identity}/live").json()

    def push_bundle(self, commit: str, bundle: bytes) -> None:
        self._request("POST", f"/api/bundles/{commit}", content=bundle)

    def fetch_bundle(self, commit: str) -> bytes:
        return self._request("GET", f"/api/bundles/{commit}").content

    def results(self, identity: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/workspaces/{identity}/results").json()

    def frontier(self, identity: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/workspaces/{identity}/frontier").json()

    def leaderboard(self, identity: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/workspaces/{identity}/leaderboard").json()

    def children(self, commit: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/commits/{commit}/children").json()
