"""Added latency of HTTP + Redis + batching over a direct Engine.generate call, and throughput vs concurrency.

Starts an embedded redis-server and `ldserve serve` (``--preset``: tiny-2b, random weights, 256 px
noise images, by default; ``demo``: the shipped demo model, 128 px pictures) on loopback, then:
1. direct: Engine.generate for one image in this process (N runs);
2. service: N sequential POST /generate (same request); added latency per request =
   end-to-end time - the server-reported inference time of its batch (so CPU noise in the
   model itself cancels out), plus e2e p50 - direct p50. Sent by a minimal keep-alive HTTP/1.1
   client on a socket (``LeanClient``: what the server adds, as a C load generator would see it),
   then by httpx (what a Python client sees: httpx's own request building and parsing took ~2 ms
   per request on the 2-core dev host, 2.6 ms against 0.45 ms for a GET /health/live);
3. throughput: bounded rounds of concurrent clients (1, 2, 4, 8) for each max_batch_size in
   ``--batch-sizes`` (default 1 and 4), a fresh server for each.
Loopback only, bounded loops. Usage: python benchmarks/service_latency.py [--n 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.embedded_redis import EmbeddedRedis  # noqa: E402

BODY = {"prompt": "a lighthouse at dusk", "seed": 1, "pruning": "balanced"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def direct(n: int, preset: str) -> list[float]:
    from model_loader.sampling import SamplingParams
    from pruning.config import pruning_config
    from pruning.engine import Engine, ImageRequest, grids_for

    if preset == "demo":
        from demo.model import load_demo_engine

        engine = load_demo_engine()
    else:
        engine = Engine.from_preset(preset)
    engine.warmup()
    # the request the service runs for BODY: the preset's default size and sampling (tau changes the
    # bits, hence what LHEP keeps and when SATS stops, hence the work)
    grids = grids_for(1.0, engine.preset.pn)
    d = engine.preset.sampling
    req = [ImageRequest(BODY["prompt"], SamplingParams(cfg=d.cfg, tau=d.tau, top_k=d.top_k, top_p=d.top_p, seed=1),
                        pruning_config(BODY["pruning"]))]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.generate(req, grids)
        out.append(time.perf_counter() - t0)
    return out


def start_server(redis_url: str, port: int, preset: str = "tiny-2b", max_batch: int = 4,
                 prefix: str = "bench") -> subprocess.Popen[bytes]:
    env = {**os.environ, "LDSERVE_MODEL_PRESET": preset, "LDSERVE_REDIS_URL": redis_url,
           "LDSERVE_KEY_PREFIX": prefix, "LDSERVE_MAX_BATCH_SIZE": str(max_batch), "LDSERVE_MAX_QUEUE_LEN": "256",
           "LDSERVE_MAX_N": str(min(4, max_batch)), "LDSERVE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, env=env)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing`` header -> {phase: ms}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


class LeanClient:
    """POST /generate over one keep-alive connection with no HTTP library: the request is prebuilt
    bytes and the response is read by its Content-Length (the API sends no chunked JSON)."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = json.dumps(BODY).encode()
        self.request = (b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def post(self) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        parts, size, need = [body], len(body), int(headers["content-length"])
        while size < need:
            parts.append(self._recv())
            size += len(parts[-1])
        return int(lines[0].split()[1]), headers, b"".join(parts)

    def close(self) -> None:
        self.sock.close()


def one_lean(client: LeanClient) -> tuple[float, float, dict[str, float]]:
    t0 = time.perf_counter()
    status, headers, body = client.post()
    e2e = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"POST /generate -> {status}: {body[:200]!r}")
    return e2e, json.loads(body)["metrics"]["inference_s"], server_timing(headers.get("server-timing", ""))


def one(client: httpx.Client, url: str) -> tuple[float, float, dict[str, float]]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/generate", json=BODY, timeout=120)
    e2e = time.perf_counter() - t0
    r.raise_for_status()
    return e2e, r.json()["metrics"]["inference_s"], server_timing(r.headers.get("server-timing", ""))


def sequential(url: str, n: int, lean: bool) -> tuple[list[float], list[float], list[dict[str, float]]]:
    if lean:
        c = LeanClient(url)
        call = lambda: one_lean(c)  # noqa: E731
    else:
        c = httpx.Client()
        call = lambda: one(c, url)  # noqa: E731
    try:
        call()  # first use of the shape
        runs = [call() for _ in range(n)]
    finally:
        c.close()
    phases = []
    for e2e, _, st in runs:  # where the added time goes, from the server's own clocks
        st = dict(st)
        st["http"] = e2e * 1e3 - st.get("app", 0.0)  # client, uvicorn, routing, validation, JSON
        # stream wake-up, the worker's store (FINISH: worker_s ends before it), pub/sub or hand-over
        st["notify"] = st.get("wait", 0.0) - st.get("infer", 0.0) - st.get("worker", 0.0)
        phases.append(st)
    return [e for e, _, _ in runs], [e - i for e, i, _ in runs], phases


def report(label: str, e2e: list[float], added: list[float], phases: list[dict[str, float]], d: list[float]) -> None:
    print(f"[{label}] service e2e (sync JSON+PNG): p50 {pct(e2e, .5) * 1000:.1f} ms  p99 {pct(e2e, .99) * 1000:.1f} ms")
    print(f"[{label}] added latency (e2e - server inference time): p50 {pct(added, .5) * 1000:.1f} ms  "
          f"p99 {pct(added, .99) * 1000:.1f} ms  mean {statistics.mean(added) * 1000:.1f} ms")
    print(f"[{label}] added latency (e2e p50 - direct p50): {(pct(e2e, .5) - pct(d, .5)) * 1000:.1f} ms")
    transport = [a * 1e3 - p.get("encode", 0.0) for a, p in zip(added, phases, strict=True)]
    print(f"[{label}] added latency without image encoding (a direct call returns pixels, not files): "
          f"p50 {pct(transport, .5):.1f} ms  p99 {pct(transport, .99):.1f} ms")
    names = ("http", "enqueue", "notify", "worker", "encode")
    print(f"[{label}] added latency by phase, p50 ms (Server-Timing; http = e2e - handler time, notify = wait - "
          "inference - worker): " + ", ".join(f"{k} {pct([p.get(k, 0.0) for p in phases], .5):.2f}" for k in names))


def throughput(url: str, clients: int, per_client: int) -> float:
    def loop(_: int) -> None:
        with httpx.Client() as c:
            for _ in range(per_client):
                one(c, url)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(loop, range(clients)))
    return clients * per_client / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--preset", default="tiny-2b", choices=("tiny-2b", "demo"))
    ap.add_argument("--batch-sizes", default="1,4", help="max_batch_size values for the throughput rounds")
    args = ap.parse_args()
    d = direct(args.n, args.preset)
    print(f"direct Engine.generate ({args.preset}, 1 image): p50 {pct(d, .5) * 1000:.1f} ms  "
          f"p99 {pct(d, .99) * 1000:.1f} ms")
    port = 18931
    url = f"http://127.0.0.1:{port}"
    with EmbeddedRedis() as redis_server:
        proc = start_server(redis_server.url, port, args.preset)
        try:
            for lean in (True, False):
                report("minimal client" if lean else "httpx client", *sequential(url, args.n, lean), d)
        finally:
            proc.terminate()
            proc.wait(60)
        for mb in (int(x) for x in args.batch_sizes.split(",") if x):  # a fresh server per batch limit
            proc = start_server(redis_server.url, port, args.preset, mb, prefix=f"bench{mb}")
            try:
                one(httpx.Client(), url)  # first use of the shape
                for c in (1, 2, 4, 8):
                    print(f"throughput: {c} concurrent clients, max_batch_size {mb}: "
                          f"{throughput(url, c, args.per_client):.2f} images/s")
            finally:
                proc.terminate()
                proc.wait(60)


if __name__ == "__main__":
    main()
