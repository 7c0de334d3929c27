"""The queue backend failing under a running `ldserve api`: Redis refusing writes (out of memory with
noeviction, as the shipped manifests configure it) and Redis gone. Clients get 503 + Retry-After in
the OpenAI envelope, nothing half-accepted is left behind, and the API recovers with Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from service.embedded_redis import EmbeddedRedis

from .conftest import Proc, base_env, free_port, start, up, wait_for


@pytest.fixture
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedRedis, Proc, str]]:
    server = EmbeddedRedis().start()  # its own server: this test stops it
    prefix = f"be{uuid.uuid4().hex[:6]}"
    api = start("api", base_env(server.url, prefix, api_keys=""), tmp_path_factory.mktemp("backend"), port=free_port())
    try:
        wait_for(lambda: up(api.url), 30, "api up", api)
        yield server, api, prefix
    finally:
        api.stop()
        server.stop()


def generate(api: Proc) -> httpx.Response:
    return httpx.post(f"{api.url}/generate", json={"prompt": "x"}, headers={"Prefer": "respond-async"}, timeout=30)


def test_backend_full_then_gone_answers_503_and_recovers(backend: tuple[EmbeddedRedis, Proc, str]) -> None:
    server, api, prefix = backend
    r = redis.Redis.from_url(server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # every write is refused with an OOM reply
    full = generate(api)
    assert full.status_code == 503 and full.headers["retry-after"] == "5", full.text
    assert full.json()["error"]["code"] == "queue_backend_full" and "x-request-id" in full.headers
    assert r.xlen(f"{prefix}:jobs") == 0 and not r.keys(f"{prefix}:job:*")  # nothing half-accepted

    r.config_set("maxmemory", "0")
    assert generate(api).status_code == 202  # recovers with the backend, no restart

    server.stop()
    gone = generate(api)
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "queue_backend_unavailable"
    assert gone.json()["error"]["type"] == "server_error"
    assert httpx.get(f"{api.url}/v1/jobs/abc").status_code == 503
    assert httpx.get(f"{api.url}/health/ready").status_code == 503
    assert httpx.get(f"{api.url}/health/live").status_code == 200
