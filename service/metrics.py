"""Prometheus metrics (prefix ``ldserve_``): the names are a contract with the Grafana dashboard.

API-side and worker-side metrics live in separate classes over a caller-given registry, so
``ldserve serve`` puts both on one registry (the API's /metrics) and split mode exports each
from its own process. No global registry: tests can build many apps in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # up to max_batch_size's bound
FRACTION_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
STOP_SCALE_BUCKETS = tuple(range(0, 14))
SPEEDUP_BUCKETS = (0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 8)
"""From 0.5: a realized speedup below 1 (pruning that cost time, or a noisy host) is visible."""
P = "ldserve"


class QueueCollector(Collector):
    """Queue depth and worker health, from a snapshot refreshed from Redis just before each scrape."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"waiting": 0, "pending": 0, "heartbeat_age": float("nan"), "ready": 0}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.snapshot
        depth = GaugeMetricFamily(f"{P}_queue_depth", "Jobs in the Redis stream: waiting (never delivered) "
                                  "and pending (delivered, not acked)", labels=["state"])
        depth.add_metric(["waiting"], s["waiting"])
        depth.add_metric(["pending"], s["pending"])
        yield depth
        yield GaugeMetricFamily(f"{P}_worker_heartbeat_age_seconds",
                                "Seconds since the most recent worker heartbeat (NaN: none seen)",
                                value=s["heartbeat_age"])
        yield GaugeMetricFamily(f"{P}_workers_ready", "Workers warm and heartbeating", value=s["ready"])


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http_requests = Counter(f"{P}_http_requests", "HTTP requests by route template, method and status",
                                     ["route", "method", "status"], registry=registry)
        self.request_duration = Histogram(f"{P}_request_duration_seconds", "End-to-end HTTP request time",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.images_generated = Counter(f"{P}_images_generated", "Images encoded and returned",
                                        ["output_format"], registry=registry)
        self.api_jobs = Counter(f"{P}_jobs", "Jobs reaching a terminal status", ["status"], registry=registry)
        self.event_streams = Gauge(f"{P}_event_streams_open", "Server-sent event streams this API process holds "
                                   "open (each waits on its own Redis connection)", registry=registry)
        self.results_in_process = Counter(f"{P}_results_in_process", "Results a waiting request took from the "
                                          "in-process worker (ldserve serve) instead of reading them from Redis",
                                          registry=registry)
        self.images_encoded_ahead = Counter(f"{P}_images_encoded_ahead", "Images a synchronous response encoded "
                                            "while the in-process worker (ldserve serve) was still storing them",
                                            registry=registry)
        self.queue = QueueCollector()
        registry.register(self.queue)

    def set_queue_snapshot(self, waiting: int, pending: int, workers: list[dict[str, Any]],
                           stale_s: float) -> None:
        ages = [w["age_s"] for w in workers]
        ready = sum(1 for w in workers if w.get("ready") and w["age_s"] < stale_s)
        self.queue.snapshot = {"waiting": waiting, "pending": pending,
                               "heartbeat_age": min(ages) if ages else float("nan"), "ready": ready}


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, jobs: Counter | None = None) -> None:
        self.registry = registry
        h = lambda name, doc, buckets, labels=(): Histogram(f"{P}_{name}", doc, list(labels), buckets=buckets,
                                                            registry=registry)
        self.queue_wait = h("queue_wait_seconds", "Enqueue to GPU start (Redis clock)", LATENCY_BUCKETS)
        self.inference = h("inference_duration_seconds", "GPU time per batch", LATENCY_BUCKETS)
        self.batch_size = h("batch_size", "Images per GPU batch", BATCH_BUCKETS)
        self.kept_fraction = h("kept_fraction", "Fraction of tokens computed at each scale, labelled by its place "
                               "from the end (last, last-1, ...: LHEP's detail scales share labels at every "
                               "resolution)", FRACTION_BUCKETS, ["scale"])
        self.uncond_stop_scale = h("uncond_stop_scale", "Scale at which SATS stopped the unconditional branch",
                                   STOP_SCALE_BUCKETS)
        self.ideal_speedup = h("ideal_speedup", "Full / executed transformer FLOPs per image", SPEEDUP_BUCKETS)
        self.realized_speedup = h("realized_speedup", "Calibrated unpruned batch time / actual batch time",
                                  SPEEDUP_BUCKETS)
        self.in_flight = Gauge(f"{P}_requests_in_flight", "Images in the batch the GPU is running now",
                               registry=registry)
        c = lambda name, doc, labels=(): Counter(f"{P}_{name}", doc, list(labels), registry=registry)
        self.tokens_computed = c("tokens_computed", "Transformer tokens computed (both branches)")
        self.batches_abandoned = c("batches_abandoned", "GPU batches stopped between scales because every job "
                                   "in them was canceled (cancel, client gone, deadline)")
        self.jobs_stopped = c("jobs_stopped", "Canceled jobs whose samples left a running batch between scales "
                              "(the batch went on for its other jobs)")
        self.tokens_full = c("tokens_full", "Transformer tokens an unpruned run computes")
        self.uncond_stop = c("uncond_stop", "Pruned images by whether SATS stopped the unconditional branch "
                             "(no_branch: guidance_scale 1, nothing to stop)", ["stopped"])
        self.jobs = jobs or c("jobs", "Jobs reaching a terminal status", ["status"])
        self.redeliveries = c("redeliveries", "Jobs reclaimed from a dead worker (XAUTOCLAIM)")
        self.calibration = c("calibration_seconds", "Device time spent timing batch shapes unpruned for the "
                             "realized speedup (while the worker was idle)")
        self.job_duration = h("job_duration_seconds", "Enqueue to result stored, per succeeded job (async and "
                              "sync alike; the Redis clock)", LATENCY_BUCKETS)
        self.dead_letters = c("dead_letters", "Jobs dead-lettered after too many deliveries")
        self.gpu_memory = Gauge(f"{P}_gpu_memory_used_bytes", "torch.cuda.memory_allocated (0 on CPU)",
                                registry=registry)
        self.model_info = Gauge(f"{P}_model_info", "Served model (value 1)",
                                ["model", "device", "dtype", "pruning_default", "version"], registry=registry)

    def record_sample(self, stats: dict[str, Any], *, pruned: bool = True, guided: bool = True) -> None:
        """One stored image. ``pruned``: its request had pruning on (the kept-fraction, SATS and
        ideal-speedup metrics describe pruned images only, the population the realized speedup is
        measured on; an unpruned image would only add 1.0s); ``guided``: it had an unconditional
        branch to stop (guidance_scale != 1)."""
        self.tokens_computed.inc(stats["tokens_computed"])
        self.tokens_full.inc(stats["tokens_full"])
        if not pruned:
            return
        fractions = stats["kept_fraction_per_scale"]
        for idx, frac in enumerate(fractions):
            self.kept_fraction.labels(scale=scale_from_end(idx, len(fractions))).observe(frac)
        stop = stats["uncond_stop_scale"]
        self.uncond_stop.labels(stopped="true" if stop is not None else "false" if guided else "no_branch").inc()
        if stop is not None:
            self.uncond_stop_scale.observe(stop)
        self.ideal_speedup.observe(stats["ideal_speedup"])


def scale_from_end(idx: int, scales: int) -> str:
    """``last``, ``last-1``, ...: a scale's label by its place from the end of its schedule. By index,
    the 13 scales of a 1024-px schedule and the 10 of a 512-px one mixed under one label (scale 9
    was the last of one and a middle scale of the other)."""
    back = scales - 1 - idx
    return "last" if back == 0 else f"last-{back}"


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
