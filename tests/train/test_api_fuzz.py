"""Schema-driven fuzzing of both APIs over real HTTP: whatever a client sends, valid or not, the answer is
never a 5xx. Bounded and derandomized, so it runs in well under a minute and the same way every time.

The served OpenAPI schema describes the Tinker routes; the `/v1` routes parse their bodies by hand, so their
body models' JSON schemas are added here. Half the cases name a real session, model, sampler and checkpoint
instead of generated ones, so the fuzzing reaches past "not found".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from nightlab.train.api.openai_bodies import ChatBody, CompletionBody
from tests.train.test_tinker_api import ALICE, Server, post, wait_future

EXAMPLES = 300
HEADERS = {"X-API-Key": ALICE, "Authorization": f"Bearer {ALICE}"}


def with_openai_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """The served schema plus the JSON bodies of /v1/completions and /v1/chat/completions."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/completions", CompletionBody), ("/v1/chat/completions", ChatBody)):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        content = {"application/json": {"schema": body}}
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    return schema


def real_ids(server: Server, base: str) -> dict[str, str]:
    """A live session, training model, sampler and checkpoint, for cases to name."""
    session = post(server, "create_session", json={"tags": []}).json()["session_id"]
    created = post(
        server,
        "create_model",
        json={"session_id": session, "model_seq_id": 0, "base_model": base, "lora_config": {"rank": 4}},
    )
    model_id = wait_future(server, created.json()["request_id"]).json()["model_id"]
    saved = post(server, "save_weights_for_sampler", json={"model_id": model_id, "seq_id": 1, "path": "fuzz"})
    path = wait_future(server, saved.json()["request_id"]).json()["path"]
    sampler = post(
        server,
        "create_sampling_session",
        json={"session_id": session, "sampling_session_seq_id": 0, "model_path": path},
    ).json()["sampling_session_id"]
    return {
        "session_id": session,
        "model_id": model_id,
        "run_id": model_id,
        "sampling_session_id": sampler,
        "sampler_id": sampler,
        "path": path,
        "model_path": path,
        "tinker_path": path,
        "base_model": base,
        "model": base,
    }


def naming(case: Any, ids: dict[str, str]) -> Any:
    """Point a generated case's identifiers at real objects; everything else stays as generated. Cases that
    would end the session or delete the checkpoint keep their generated ids, so the objects live on."""
    if case.method.upper() == "DELETE" or case.path.endswith("/finish"):
        return case
    for name in list(case.path_parameters or {}):
        if name in ids:
            case.path_parameters[name] = ids[name]
    if isinstance(case.body, dict):
        for name in list(case.body):
            if name in ids:
                case.body[name] = ids[name]
    return case


def test_no_request_gets_a_server_error(server: Server, tiny_model_dir: Path) -> None:
    served = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(with_openai_bodies(served))
    ids = real_ids(server, str(tiny_model_dir))
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases, st.booleans())
    def fuzz(case: Any, real: bool) -> None:
        if real:
            naming(case, ids)
        answer = case.call(base_url=server.url, headers=HEADERS, timeout=60)
        if answer.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} {case.body!r:.300}: {answer.text:.300}")

    fuzz()
    assert failures == []
