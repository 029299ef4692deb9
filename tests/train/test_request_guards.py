"""What a hostile or confused client cannot do to `nightlab serve` before any route runs (real HTTP).

No request blocks the event loop (a huge prompt is refused by its length before it is tokenized); a body is
read only from a client with a key, only up to the configured size, and a compressed one only up to that
size once expanded; a declared tensor shape cannot make the server allocate more than its datum justifies;
a web page cannot drive a local server (JSON only, loopback Host only, no foreign Origin).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tinker
import zstandard
from tinker.proto import tinker_public_pb2 as pb

from nightlab.train.api.app import create_app
from nightlab.train.api.background import serve_in_thread
from nightlab.train.api.wire import PROTOBUF
from nightlab.train.engine import Engine
from nightlab.train.settings import ServeSettings
from tests.train.test_tinker_api import ALICE, Server, start_server

LIMIT = 1 << 20  # a 1 MiB request limit for the keyed server
JSON = "application/json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("guards"),
        str(tiny_model_dir),
        max_request_bytes=LIMIT,
        allowed_origins=["http://localhost:3000"],
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    """A server as `nightlab serve` starts by default: on loopback, without keys, the default limits."""
    data_dir = tmp_path_factory.mktemp("keyless")
    settings = ServeSettings(data_dir=data_dir, device="cpu", allowed_models=[str(tiny_model_dir)])
    with serve_in_thread(create_app(settings, Engine(data_dir, device="cpu", show_progress=False))) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def model_id(server: Server, tiny_model_dir: Path) -> str:
    service = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
    return service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result().model_id


def send(url: str, route: str, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    """A POST with exactly these headers: a content type, Alice's key unless `x_api_key` says otherwise."""
    fields = {"X-API-Key": ALICE, "content-type": content_type}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    return httpx.post(f"{url}/api/v1/{route}", content=body, headers=fields, timeout=30)


def test_a_prompt_far_past_the_context_is_refused_before_it_is_tokenized(keyless, tiny_model_dir):
    client = openai.OpenAI(base_url=f"{keyless}/v1", api_key="unused", max_retries=0, timeout=20)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=str(tiny_model_dir), prompt="to be or not " * 160_000, max_tokens=1)
    assert refused.value.code == "context_length_exceeded" and "characters" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        messages = [{"role": "user", "content": "x" * 2_000_000}]
        client.chat.completions.create(model=str(tiny_model_dir), messages=messages, max_tokens=1)
    assert refused.value.code == "context_length_exceeded"
    assert httpx.get(f"{keyless}/api/v1/healthz", timeout=5).status_code == 200


def test_a_big_body_without_a_key_is_refused_before_it_is_read(server):
    body = b"{" + b" " * (4 * LIMIT) + b"}"
    keyless = send(server.url, "create_model", body, JSON, x_api_key="")
    assert keyless.status_code == 401 and "API key" in keyless.json()["error"]
    keyed = send(server.url, "create_model", body, JSON)
    assert keyed.status_code == 413 and f"{LIMIT} bytes" in keyed.json()["error"]


def test_a_body_sent_in_chunks_is_counted_as_it_arrives(server):
    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(4):
            yield b" " * LIMIT

    done = httpx.post(
        f"{server.url}/api/v1/create_model",
        content=chunks(),
        headers={"X-API-Key": ALICE, "content-type": JSON},
        timeout=30,
    )
    assert done.status_code == 413


def test_a_zstd_bomb_is_stopped_at_the_limit(server, model_id):
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * LIMIT))
    assert len(bomb) < 32 << 10
    done = send(server.url, "forward_backward", bomb, PROTOBUF, content_encoding="zstd")
    assert done.status_code == 413 and "expands past" in done.json()["error"]


def test_a_huge_declared_sparse_shape_is_refused_without_allocating_it(server, model_id):
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray([5, 6, 7], np.int32).tobytes()
    weights = datum.loss_fn_inputs["weights"]
    weights.dtype = pb.DTYPE_FLOAT32
    weights.shape.extend([1, 2**28])
    weights.sparse_csr.crow_indices = np.asarray([0, 0], np.int64).tobytes()
    body = msg.SerializeToString()
    assert len(body) < 200
    done = send(server.url, "forward_backward", body, PROTOBUF)
    error = done.json()["error"]
    assert done.status_code == 400 and "at most" in error and "[1, 268435456]" in error


PAGE_ATTACKS = {
    "text-plain-v1": ("POST", "/v1/completions", {"content-type": "text/plain"}, 415, JSON),
    "text-plain-tinker": ("POST", "/api/v1/create_session", {"content-type": "text/plain"}, 415, JSON),
    "foreign-host": (
        "POST",
        "/v1/completions",
        {"content-type": JSON, "host": "evil.example:80"},
        403,
        "Host",
    ),
    "rebinding-get": ("GET", "/v1/models", {"host": "rebound.example"}, 403, "Host"),
    "foreign-origin": (
        "POST",
        "/v1/completions",
        {"content-type": JSON, "origin": "http://x.example"},
        403,
        "Origin",
    ),
    "delete-from-a-page": (
        "DELETE",
        "/api/v1/training_runs/x/checkpoints/y",
        {"origin": "null"},
        403,
        "Origin",
    ),
}


@pytest.mark.parametrize("attack", PAGE_ATTACKS)
def test_a_web_page_cannot_drive_a_keyless_local_server(keyless, attack):
    method, path, headers, status, words = PAGE_ATTACKS[attack]
    content = b"{}" if method == "POST" else None
    done = httpx.request(method, keyless + path, headers=headers, content=content, timeout=30)
    assert done.status_code == status, done.text
    assert words in done.json()["error"]


def test_an_allowed_origin_and_the_official_clients_pass(server, tiny_model_dir):
    headers = {"origin": "http://localhost:3000", "authorization": f"Bearer {ALICE}"}
    assert httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30).status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0, timeout=60)
    reply = client.completions.create(model=str(tiny_model_dir), prompt="to be", max_tokens=2, temperature=0)
    assert reply.choices[0].text is not None


def test_requests_addressed_to_localhost_by_name_pass(keyless):
    port = keyless.rsplit(":", 1)[1]
    assert httpx.get(f"http://localhost:{port}/api/v1/healthz", timeout=30).status_code == 200
    with socket.create_connection(("127.0.0.1", int(port))) as sock:
        request = f"GET /api/v1/healthz HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
