"""The worker's only view of the model: builds ``pruning.Engine`` from settings, warms up, runs batches.

Realized-speedup calibration: for every batch shape (scale schedule, images, images with a
guidance branch) one timed run of the batch's requests with pruning off, once (warm-up does it
for the default schedule, one guided image). A pruned batch of a shape not timed yet reports
nothing and leaves its requests to be timed when the worker is idle (``calibrate_pending``), so
the GPU does not run it while jobs wait, and a first, cold batch of a new shape is not compared
with a warm re-run; each later pruned batch of that shape reports unpruned time / its time.
Regular unpruned batches do not move the reference (they did: an ``off`` batch with guidance 1
became the reference of guided pruned batches).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from model_loader.sampling import SamplingParams
from pruning.config import PruningConfig
from pruning.engine import Engine, ImageRequest, grids_for

from .settings import ServiceSettings
from .spec import JobSpec, preview_scales

log = logging.getLogger(__name__)
Grids = tuple[tuple[int, int], ...]
EventSink = Callable[[list[tuple[int, dict[str, Any]]]], None]
"""Receives a batch's events as (index of the job in the batch, stream fields)."""
EmitScale = Callable[[int, Callable[[list[int]], torch.Tensor], set[int]], None]
"""(scale index, preview decoder, jobs that ended): a scale's events."""


class BatchAbandoned(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised between scales when every job of the batch was canceled: the rest is not computed."""

    def __init__(self, scales_done: int, scales: int) -> None:
        super().__init__(f"abandoned after scale {scales_done} of {scales}"
                         + (" (during the final decode)" if scales_done == scales else ""))
        self.scales_done = scales_done
        self.scales = scales


@dataclass
class ImageOut:
    rgb: bytes
    width: int
    height: int
    stats: dict[str, Any]
    prompt_truncated: bool
    text_tokens: int = 0


@dataclass
class BatchOut:
    images: list[list[ImageOut]]
    """Per job, its n images."""
    seconds: float
    pruned: bool
    stopped: list[int] = field(default_factory=list)
    """Jobs (indices) whose samples left the batch when they were canceled: no images to store."""


def pruning_from_dict(d: dict[str, Any] | None) -> PruningConfig | None:
    if d is None:
        return None
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    cfg = PruningConfig(**fixed)
    return cfg if cfg.enabled else None


def requests_for(spec: JobSpec) -> list[ImageRequest]:
    pruning = pruning_from_dict(spec.pruning)
    return [ImageRequest(spec.prompt, SamplingParams(cfg=spec.cfg, tau=spec.tau, top_k=spec.top_k, top_p=spec.top_p,
                                                     seed=seed), pruning, spec.negative_prompt or None)
            for seed in spec.seeds]


class EngineClient:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        if settings.model_preset == "demo" and settings.transformer_path is None:
            from demo.model import load_demo_engine  # the shipped demo weights and their tiny T5

            self.engine = load_demo_engine(device=settings.device)
        else:
            self.engine = Engine.from_preset(settings.model_preset, transformer_path=settings.transformer_path,
                                             vae_path=settings.vae_path, text_encoder_path=settings.text_encoder_path,
                                             device=settings.device, dtype_policy=settings.dtype_policy)
        if self.engine.model.device.type == "cuda":
            self.engine.set_cuda_graphs(settings.cuda_graphs)
        self.unpruned_s: dict[tuple[Grids, int, int], float] = {}
        self.pending: dict[tuple[Grids, int, int], list[ImageRequest]] = {}
        """Shapes seen in pruned batches and not timed yet, with unpruned requests to time them."""

    @property
    def model_name(self) -> str:
        return self.engine.preset.name

    @property
    def dtype(self) -> str:
        return str(self.engine.model.compute_dtype).removeprefix("torch.")

    def warmup(self) -> float:
        t = self.engine.warmup()
        if self.settings.calibrate_realized_speedup:
            spec_grids = grids_for(1.0, self.engine.preset.pn)
            d = self.engine.preset.sampling  # the requests that name nothing: the most common shape
            self._time_unpruned([ImageRequest("calibration", SamplingParams(cfg=d.cfg, tau=d.tau, top_k=d.top_k,
                                                                            top_p=d.top_p, seed=0))], spec_grids)
        return t

    def generate(self, specs: list[JobSpec], events: EventSink | None = None,
                 ended: Callable[[], Collection[int]] | None = None) -> BatchOut:
        """One batch of jobs sharing a batch key; raises on engine errors. ``events`` receives,
        after every scale, one ``progress`` event per job (unless the setting
        ``progress_events`` is off) and a ``partial_image`` event (raw RGB in ``img``) per image
        that asked for a preview at that scale. ``ended()``: the jobs (indices) canceled
        meanwhile, asked after every scale (the last: before the final decode): their samples leave
        the batch, the others go on as if alone (``BatchOut.stopped``); when every job has ended,
        the batch stops with ``BatchAbandoned``."""
        grids = grids_for(specs[0].h_div_w, specs[0].pn)
        reqs = [r for s in specs for r in requests_for(s)]
        first = [sum(s.n for s in specs[:j]) for j in range(len(specs))]  # each job's first sample
        t0 = time.perf_counter()
        wanted = [preview_scales(grids, s.partial_images) for s in specs]
        emit = (self._scale_events(specs, first, grids, wanted, events)
                if events is not None and (self.settings.progress_events or any(wanted)) else None)
        gone: set[int] = set()

        def stopped() -> set[int]:
            gone.update(ended() if ended is not None else ())
            return {first[j] + k for j in gone for k in range(specs[j].n)}

        def on_scale(si: int, preview: Callable[[list[int]], torch.Tensor]) -> None:
            if ended is not None and len(stopped()) == len(reqs):
                raise BatchAbandoned(si + 1, len(grids))
            if emit is not None:
                emit(si, preview, gone)

        results = self.engine.generate(reqs, grids, on_scale=on_scale if emit or ended else None,
                                       stopped=stopped if ended is not None else None)
        if all(r.stopped for r in results):  # the last ended between the last scale and the decode
            raise BatchAbandoned(len(grids), len(grids))
        self._sync()
        seconds = time.perf_counter() - t0
        h, w = self.engine.image_size(grids)
        flat = [ImageOut(r.image_HW3.contiguous().cpu().numpy().tobytes(), w, h, r.stats.to_dict(),
                         r.prompt_truncated, r.text_tokens) for r in results]
        out, i = [], 0
        for s in specs:
            out.append(flat[i:i + s.n])
            i += s.n
        pruned = any(r.pruning is not None for r in reqs)
        cut = [j for j in range(len(specs)) if results[first[j]].stopped]
        return BatchOut(out, seconds, pruned, cut)

    def _scale_events(self, specs: list[JobSpec], first: list[int], grids: Grids, wanted: list[list[int]],
                      events: EventSink) -> EmitScale:
        h, w = self.engine.image_size(grids)
        progress_on = self.settings.progress_events

        def on_scale(si: int, preview: Callable[[list[int]], torch.Tensor], gone: set[int]) -> None:
            progress = {"scale": si + 1, "scales": len(grids), "grid": list(grids[si])}
            out: list[tuple[int, dict[str, Any]]] = ([(j, {"type": "progress", "data": json.dumps(progress)})
                                                       for j in range(len(specs)) if j not in gone]
                                                     if progress_on else [])
            asked = [(j, k) for j, s in enumerate(specs) if si in wanted[j] and j not in gone for k in range(s.n)]
            if asked:
                images = preview([first[j] + k for j, k in asked])
                for (j, k), img in zip(asked, images, strict=True):
                    data = {**progress, "image_index": k, "partial_image_index": wanted[j].index(si),
                            "width": w, "height": h}
                    out.append((j, {"type": "partial_image", "data": json.dumps(data),
                                    "img": img.contiguous().numpy().tobytes()}))
            if out:
                events(out)

        return on_scale

    def realized_speedup(self, specs: list[JobSpec], seconds: float) -> float | None:
        """Unpruned time / actual time for a pruned batch whose shape is timed; None for a shape not
        timed yet (queued for ``calibrate_pending``) or with calibration off."""
        if not self.settings.calibrate_realized_speedup:
            return None
        grids = grids_for(specs[0].h_div_w, specs[0].pn)
        reqs = [replace(r, pruning=None) for s in specs for r in requests_for(s)]
        key = _shape(grids, reqs)
        if key not in self.unpruned_s:
            self.pending.setdefault(key, reqs)
            return None
        return self.unpruned_s[key] / seconds if seconds > 0 else None

    def calibrate_pending(self) -> float:
        """Time one pending shape unpruned (the worker calls this when idle); seconds spent."""
        if not self.pending:
            return 0.0
        key, reqs = next(iter(self.pending.items()))
        del self.pending[key]
        return self._time_unpruned(reqs, key[0])

    def _time_unpruned(self, reqs: list[ImageRequest], grids: Grids) -> float:
        t0 = time.perf_counter()
        self.engine.generate(reqs, grids)
        self._sync()
        took = time.perf_counter() - t0
        self.unpruned_s[_shape(grids, reqs)] = took
        log.info("calibrated unpruned time for %d image(s) at %s: %.3f s", len(reqs), grids[-1], took)
        return took

    def _sync(self) -> None:
        if self.settings.device.startswith("cuda"):
            torch.cuda.synchronize()

    def gpu_memory_bytes(self) -> int:
        if self.settings.device.startswith("cuda") and torch.cuda.is_available():
            return int(torch.cuda.memory_allocated())
        return 0


def _shape(grids: Grids, reqs: list[ImageRequest]) -> tuple[Grids, int, int]:
    """What the unpruned time of a batch depends on: schedule, images, images with an unconditional
    branch (guidance_scale 1 halves the work)."""
    return grids, len(reqs), sum(1 for r in reqs if r.sampling.uses_uncond)
