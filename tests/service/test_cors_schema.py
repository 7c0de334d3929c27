"""An `ldserve api` with a CORS allow-list and its own limits: browsers on an allowed origin can read the
headers our responses carry (stats of raw images included), a refused preflight answers in the error
envelope, and the OpenAPI schema states the server's limits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.convert import STATS_HEADERS

from .conftest import Proc, base_env, free_port, start, up, wait_for

APP = "https://app.example.com"


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    env = base_env(redis_url, f"cors{uuid.uuid4().hex[:6]}", api_keys="", cors_origins=f"{APP},http://localhost:3000",
                   max_n=3, max_batch_size=3, max_prompt_chars=500)
    p = start("api", env, Path(tmp_path_factory.mktemp("cors")), port=free_port())
    try:
        wait_for(lambda: up(p.url), 30, "api up", p)
        yield p
    finally:
        p.stop()


def _preflight(api: Proc, origin: str, method: str = "POST", headers: str = "content-type") -> httpx.Response:
    return httpx.options(f"{api.url}/generate", headers={"Origin": origin, "Access-Control-Request-Method": method,
                                                         "Access-Control-Request-Headers": headers})


def test_allowed_origin(api: Proc) -> None:
    r = _preflight(api, APP, headers="content-type, authorization, idempotency-key, prefer")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    r = httpx.get(f"{api.url}/v1/jobs/nope", headers={"Origin": APP})  # a simple request: any response
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == APP
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    # what a page reads from a raw-image response (seed and stats) and from the others
    assert exposed >= {"x-request-id", "x-job-id", "retry-after", "location", "server-timing", *STATS_HEADERS}


@pytest.mark.parametrize("origin,method,param", [
    ("https://evil.example.com", "POST", "Origin"),
    (APP, "DELETE", "Access-Control-Request-Method"),
])
def test_refused_preflight_answers_in_the_envelope(api: Proc, origin: str, method: str, param: str) -> None:
    r = _preflight(api, origin, method)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "cors_not_allowed" and err["param"] == param and err["type"] == "invalid_request_error"
    assert r.headers["x-request-id"]
    assert "access-control-allow-origin" not in r.headers or r.headers["access-control-allow-origin"] == APP


def test_schema_states_the_server_limits(api: Proc) -> None:
    """Clients generated from the schema accepted n up to 16 (the most max_n may be set to) while
    this server refuses more than its max_n."""
    schemas = httpx.get(f"{api.url}/openapi.json").json()["components"]["schemas"]
    for name in ("GenerateRequest", "OpenAIImageRequest"):
        props = schemas[name]["properties"]
        assert props["n"]["maximum"] == 3 and props["prompt"]["maxLength"] == 500, name
    r = httpx.post(f"{api.url}/generate", json={"prompt": "x", "n": 4}, headers={"Prefer": "respond-async"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
