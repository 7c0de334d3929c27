"""`ldserve serve` on its embedded Redis ends cleanly: SIGTERM answers the request in flight, drains
the worker and stops the redis-server it started; a SIGKILL leaves no redis-server behind either."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Proc, base_env, free_port, ready, serving, start, up, wait_for


def _embedded(p: Proc) -> tuple[int, Path]:
    """The embedded redis-server's pid and socket directory, from the server's log."""
    m = re.search(r"embedded redis-server at unix://(\S+)/redis\.sock\?db=0 \(pid (\d+)\)", p.log.read_text())
    assert m, p.logs()
    return int(m.group(2)), Path(m.group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped yet) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def _serve_embedded(tmp: Path) -> tuple[Proc, int, Path]:
    env = base_env("unused", "exit")
    del env["LDSERVE_REDIS_URL"]  # ldserve serve starts its own
    p = start("serve", env, tmp, port=free_port())
    wait_for(lambda: ready(p.url), 120, "serve ready", p)
    pid, sock_dir = _embedded(p)
    assert _alive(pid) and sock_dir.is_dir()
    return p, pid, sock_dir


def test_sigterm_answers_the_request_in_flight_and_stops_the_embedded_redis(tmp_path: Path) -> None:
    p, pid, sock_dir = _serve_embedded(tmp_path)
    try:
        got: dict[str, httpx.Response] = {}
        client = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
            f"{p.url}/generate", json={"prompt": "in flight", "resolution": 512, "n": 2}, timeout=120)))
        client.start()
        wait_for(lambda: _in_flight(p) > 0, 60, "the job on the worker", p, interval=0.02)
        p.signal(signal.SIGTERM)
        client.join(120)
        assert got["r"].status_code == 200, got["r"].text
        assert len(got["r"].json()["data"]) == 2
        assert p.proc.wait(60) == 0, p.logs()
        assert "the worker finishes its batch" in p.logs()
        wait_for(lambda: not _alive(pid), 10, "the embedded redis-server to stop")
        assert not sock_dir.exists()
    finally:
        p.stop()


def _in_flight(p: Proc) -> float:
    text = httpx.get(f"{p.url}/metrics", timeout=5).text
    m = re.search(r"^ldserve_requests_in_flight (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux (PR_SET_PDEATHSIG)")
def test_sigkill_leaves_no_redis_server(tmp_path: Path) -> None:
    p, pid, _ = _serve_embedded(tmp_path)
    p.signal(signal.SIGKILL)
    p.proc.wait(10)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_api_drain_ends_at_drain_timeout(redis_url: str, tmp_path: Path) -> None:
    """`ldserve api` after SIGTERM holds a waiting synchronous request for DRAIN_TIMEOUT_S, not for the
    synchronous deadline (120 s here): the Kubernetes grace period is sized on it."""
    env = base_env(redis_url, f"drain{os.getpid()}", drain_timeout_s=2, sync_timeout_s=120)
    p = start("api", env, tmp_path, port=free_port())
    try:
        wait_for(lambda: up(p.url), 30, "api up", p)
        got: dict[str, object] = {}

        def wait_on_no_worker() -> None:
            try:
                got["r"] = httpx.post(f"{p.url}/generate", json={"prompt": "nobody runs this"}, timeout=60)
            except httpx.HTTPError as e:
                got["r"] = e

        client = threading.Thread(target=wait_on_no_worker)
        client.start()
        wait_for(lambda: "queued" in _queue_text(p), 10, "the request's job queued")
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        p.proc.wait(30)
        took = time.monotonic() - t0
        client.join(30)
        assert 1.5 <= took < 10, (took, p.logs())
        assert isinstance(got["r"], httpx.HTTPError) or got["r"].status_code >= 500  # cut, not answered 200
    finally:
        p.stop()


def test_drain_delay_keeps_serving_with_readiness_503(redis_url: str, tmp_path: Path) -> None:
    """DRAIN_DELAY_S: after SIGTERM `ldserve serve` answers /health/ready 503 (draining) and still serves
    requests for that long, then drains and exits 0; it runs no calibration of a new shape meanwhile
    (device work nobody waits for: the idle worker timed the shape of the last batch before). Without
    a delay, uvicorn closes its listener at once and readiness is never seen answering 503."""
    env = base_env(redis_url, f"delay{os.getpid()}", drain_delay_s=5, api_keys="")
    with serving("serve", env, tmp_path) as p:
        p.signal(signal.SIGTERM)
        t0 = time.monotonic()
        r = httpx.get(f"{p.url}/health/ready", timeout=5)
        assert r.status_code == 503 and r.json()["checks"]["draining"] is True, r.text
        assert httpx.get(f"{p.url}/health/live", timeout=5).status_code == 200
        # still served, at a shape the worker never ran (its calibration would be due once idle)
        r = httpx.post(f"{p.url}/generate", json={"prompt": "after the signal", "resolution": 512}, timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 5, "the request was not answered within the delay: inconclusive"
        assert p.proc.wait(60) == 0, p.logs()
        assert time.monotonic() - t0 >= 4.5
        logs = p.logs()
        assert "the listener closes in 5.0 s" in logs
        assert "at (32, 32)" not in logs, logs  # no calibration of the 512 px shape


def _queue_text(p: Proc) -> str:
    m = re.search(r'^ldserve_queue_depth\{state="waiting"\} (\S+)$', httpx.get(f"{p.url}/metrics", timeout=5).text,
                  re.M)
    return "queued" if m and float(m.group(1)) >= 1 else ""


def test_serve_exits_when_the_model_fails_to_load(tmp_path: Path) -> None:
    """A model that cannot load ends `ldserve serve` with the reason (it stayed up, never ready, and
    its requests ended in 504s that did not say why), and stops its embedded Redis."""
    env = base_env("unused", "noload", transformer_path=tmp_path / "missing.pth", vae_path=tmp_path / "vae.pth")
    del env["LDSERVE_REDIS_URL"]
    p = start("serve", env, tmp_path, port=free_port())
    try:
        rc = p.proc.wait(60)
        pid, _ = _embedded(p)
        assert rc == 1, p.logs()
        assert f"checkpoint not found: {tmp_path / 'vae.pth'}" in p.logs()  # checked before anything loads
        wait_for(lambda: not _alive(pid), 10, "the embedded redis-server to stop")
    finally:
        p.stop()


def test_serve_exits_when_its_embedded_redis_dies(tmp_path: Path) -> None:
    """Its requests would all get 503 while /health/live said 200: the process ends (exit 1) so its
    supervisor restarts the pair."""
    p, pid, _ = _serve_embedded(tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        assert p.proc.wait(60) == 1, p.logs()
        assert "the embedded redis-server exited" in p.logs()
    finally:
        p.stop()
