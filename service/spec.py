"""The job wire type shared by the API and the worker (JSON in the job hash; no torch)."""

from __future__ import annotations

import hashlib
import itertools
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
    partial_images: int = 0
    """Previews per image (0-3): the codes summed so far, decoded after scales spread over the
    schedule's tokens (``preview_scales``), sent as events of the job."""

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def batch_key(self) -> tuple[str, float]:
        """Jobs with equal keys share one scale schedule and can run in one batch."""
        return (self.pn, self.h_div_w)

    @property
    def batch_tag(self) -> str:
        """``batch_key`` as the string a stream entry carries (``READ_IF_JOINS``)."""
        return f"{self.pn}|{self.h_div_w!r}"

    def payload_hash(self, *, drawn_seeds: bool = False) -> str:
        """Idempotency fingerprint of what the client asked for. ``drawn_seeds``: the server drew
        the seeds (the request had none), so they are not part of it: a retry of the same request
        draws others, and must still find the first job (which keeps the seeds it drew)."""
        doc = self.model_dump()
        if drawn_seeds:
            doc["seeds"] = len(self.seeds)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def preview_scales(grids: tuple[tuple[int, int], ...] | list[tuple[int, int]], k: int) -> list[int]:
    """Scales after which ``k`` previews are decoded: preview j after the first scale whose tokens
    so far reach (j + 1) / (k + 1) of the schedule's (tokens track time), never after the last
    scale (that is the image), each scale once. The last scales hold most tokens, so previews come
    late: 1024 px (13 scales), k = 3: after 32x32, 40x40 and 48x48; the demo's 7 scales: after
    6x6, 8x8 and 12x12."""
    sizes = [h * w for h, w in grids]
    ends = list(itertools.accumulate(sizes))[:-1]
    out: list[int] = []
    for j in range(min(k, len(ends))):
        goal = (j + 1) / (k + 1) * sum(sizes)
        reached = [i for i, e in enumerate(ends) if e >= goal and i not in out]
        out.append(reached[0] if reached else max(i for i in range(len(ends)) if i not in out))
    return sorted(out)
