"""The job wire type shared by the API and the worker (JSON in the job hash; no torch)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

OutputFormat = Literal["png", "jpeg", "webp"]
TERMINAL = ("succeeded", "failed", "canceled", "expired")
STATUSES = ("queued", "processing", *TERMINAL)


class JobSpec(BaseModel):
    """One job: ``len(seeds)`` images of one prompt at one scale schedule (version 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = 1
    prompt: str
    negative_prompt: str | None = None
    seeds: list[int]
    h_div_w: float
    """Official aspect template (h / w)."""
    pn: str
    width: int
    height: int
    cfg: float
    tau: float
    top_k: int
    top_p: float
    pruning: dict[str, Any] | None
    """Full PruningConfig fields, or None for no pruning."""
    pruning_label: str
    output_format: OutputFormat = "png"
    quality: int | None = None
    route: str = "generate"

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def batch_key(self) -> tuple[str, float]:
        """Jobs with equal keys share one scale schedule and can run in one batch."""
        return (self.pn, self.h_div_w)

    def payload_hash(self) -> str:
        """Idempotency fingerprint of what the client asked for."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:32]
