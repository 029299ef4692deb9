"""The one base class of every error a user can fix (a bad config, a dirty workspace, a service that is down).

Each subclass keeps its standard-library base as well (`ConfigError` is still a `ValueError`), so callers that
catch the stdlib class keep working; the CLI catches `NightlabError` alone and prints its message, no
traceback.
"""

from __future__ import annotations


class NightlabError(Exception):
    """Something the user can fix; the message says what went wrong and what to do next."""
