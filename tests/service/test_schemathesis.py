"""Schemathesis over our OpenAPI schema (bounded examples): no input may produce a 5xx.

Runs against a real `ldserve api` process with no worker and every generation forced to
`Prefer: respond-async`, so fuzzed sizes (up to 1024 px) are validated and queued but never
generated on the CPU; the generation paths themselves are covered by test_e2e.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import AUTH, Proc, base_env, serving


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    env = base_env(redis_url, f"st{uuid.uuid4().hex[:6]}", api_keys=AUTH["Authorization"][7:], max_queue_len=100_000)
    with serving("api", env, tmp_path_factory.mktemp("st"), timeout=30) as p:
        yield p


@pytest.fixture(scope="module")
def api_schema(api: Proc) -> schemathesis.BaseSchema:
    raw = httpx.get(f"{api.url}/openapi.json", headers=AUTH).json()
    return schemathesis.openapi.from_dict(raw)


def check(case: schemathesis.Case, api: Proc) -> None:
    case.headers = {**(case.headers or {}), **AUTH, "Prefer": "respond-async"}
    response = case.call(base_url=api.url, timeout=30)
    if case.path == "/health/ready":  # 503 by design: this process has no worker
        assert response.status_code == 503
        return
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    headers = {k.lower(): v for k, v in response.headers.items()}
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "x-request-id" in headers


def test_no_server_errors(api: Proc, api_schema: schemathesis.BaseSchema) -> None:
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: schemathesis.Case) -> None:
            check(case, api)

        run()
