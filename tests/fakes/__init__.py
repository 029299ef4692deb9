"""Stand-ins for services outside nightlab that tests cannot reach (an external LLM provider)."""

from tests.fakes.scripted_openai import Reply, ScriptedOpenAI

__all__ = ["Reply", "ScriptedOpenAI"]
