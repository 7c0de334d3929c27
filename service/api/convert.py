"""Requests -> JobSpec (validation that needs settings), and Job -> response bodies."""

from __future__ import annotations

import secrets
from typing import Any

from model_loader.configs import PRESETS as MODEL_PRESETS
from pruning.config import pruning_config

from ..imaging import DEFAULT_PNG, PngParams, encode_all
from ..queue import Job
from ..settings import ServiceSettings
from ..sizing import ModelSizes, SizeError, parse_openai_size, resolve_size
from ..spec import JobSpec
from .errors import ApiError
from .jsonbody import Base64
from .schemas import GenerateRequest, OpenAIImageRequest, PruningOptions


def _check_limits(prompt: str, negative: str | None, n: int, s: ServiceSettings) -> None:
    if len(prompt) > s.max_prompt_chars:
        raise ApiError(400, f"prompt has {len(prompt)} characters; the limit is {s.max_prompt_chars}",
                       param="prompt", code="prompt_too_long")
    if negative is not None and len(negative) > s.max_prompt_chars:
        raise ApiError(400, f"negative_prompt is longer than {s.max_prompt_chars} characters",
                       param="negative_prompt", code="prompt_too_long")
    if n > s.max_n:
        raise ApiError(400, f"n must be at most {s.max_n}, got {n}", param="n", code="invalid_value")


def resolve_pruning(value: str | PruningOptions | None, s: ServiceSettings) -> tuple[dict[str, Any] | None, str]:
    """(full PruningConfig dict or None for off, label); ApiError(400, param=pruning...) if invalid."""
    if value is None:
        value = s.pruning_default
    if isinstance(value, str):
        preset, overrides, label = value, {}, value
    else:
        preset = value.preset or s.pruning_default
        overrides = value.model_dump(exclude_none=True, exclude={"preset"})
        label = preset if not overrides else "custom"
    try:
        cfg = pruning_config(preset, **overrides).to_dict()
    except (ValueError, TypeError) as e:
        msg = str(e)
        field = msg.split(":")[0].removeprefix("pruning.") if msg.startswith("pruning.") else None
        param = "pruning" if isinstance(value, str) else f"pruning.{field or 'preset'}"
        raise ApiError(400, msg, param=param, code="invalid_pruning") from None
    # a setting of a part that is off would do nothing, and "custom" would claim otherwise
    idle = {"energy_keep_ratio": "lhep", "fill_mode": "lhep", "lhep_last_scales": "lhep", "energy_smoothing": "lhep",
            "token_score": "lhep", "uncond_stop_tol": "sats"}
    for field, part in idle.items():
        if field in overrides and not cfg[part]:
            raise ApiError(400, f"pruning.{field}: has no effect while {part.upper()} is off (preset {preset!r}"
                           f"{f' with {part}: false' if overrides.get(part) is False else ''}); set {part}: true, "
                           "or leave it out", param=f"pruning.{field}", code="invalid_pruning")
    enabled = cfg["lhep"] or cfg["sats"] or cfg["force_stop_scale"] is not None
    return (cfg if enabled else None), label


def _seeds(seed: int | None, n: int) -> list[int]:
    base = secrets.randbelow(2**62) if seed is None else seed
    if base + n - 1 > 2**63 - 1:
        raise ApiError(400, "seed + n - 1 (the last image's seed) must stay below 2^63", param="seed",
                       code="invalid_value")
    return [base + i for i in range(n)]


def _size(s: ServiceSettings, param: str | None = None, **kw: Any) -> Any:
    """``param``: the request field to name in an error (default: the field the resolver names)."""
    preset = MODEL_PRESETS[s.model_preset]
    try:
        return resolve_size(sizes=ModelSizes(preset.served_pns, preset.pn, preset.pixels_per_token), **kw)
    except SizeError as e:
        raise ApiError(400, str(e), param=param or e.param, code="invalid_size") from None


def spec_from_generate(req: GenerateRequest, s: ServiceSettings) -> JobSpec:
    _check_limits(req.prompt, req.negative_prompt, req.n, s)
    size = _size(s, width=req.width, height=req.height, aspect_ratio=req.aspect_ratio, resolution=req.resolution)
    pruning, label = resolve_pruning(req.pruning, s)
    d = MODEL_PRESETS[s.model_preset].sampling
    return JobSpec(prompt=req.prompt, negative_prompt=req.negative_prompt or None, seeds=_seeds(req.seed, req.n),
                   h_div_w=size.h_div_w, pn=size.pn, width=size.width, height=size.height,
                   cfg=d.cfg if req.guidance_scale is None else req.guidance_scale,
                   tau=d.tau if req.temperature is None else req.temperature,
                   top_k=d.top_k if req.top_k is None else req.top_k, top_p=d.top_p if req.top_p is None else req.top_p,
                   pruning=pruning, pruning_label=label, output_format=req.output_format, quality=req.quality,
                   route="generate", partial_images=req.partial_images)


def spec_from_openai(req: OpenAIImageRequest, s: ServiceSettings) -> JobSpec:
    if req.background == "transparent":
        raise ApiError(400, "transparent backgrounds are not supported", param="background", code="unsupported_value")
    if req.model is not None and req.model not in (s.model_preset, *s.model_aliases):
        names = ", ".join(repr(n) for n in (s.model_preset, *s.model_aliases))
        raise ApiError(404, f"model {req.model!r} is not served here; use {names}", param="model",
                       code="model_not_found")
    _check_limits(req.prompt, req.negative_prompt, req.n, s)
    try:
        width, height = parse_openai_size(req.size)
    except SizeError as e:
        raise ApiError(400, str(e), param="size", code="invalid_size") from None
    size = _size(s, "size", width=width, height=height, aspect_ratio=None, resolution=None)
    pruning, label = resolve_pruning(req.pruning, s)
    d = MODEL_PRESETS[s.model_preset].sampling
    fmt = req.output_format or "png"
    return JobSpec(prompt=req.prompt, negative_prompt=req.negative_prompt or None, seeds=_seeds(req.seed, req.n),
                   h_div_w=size.h_div_w, pn=size.pn, width=size.width, height=size.height,
                   cfg=d.cfg if req.guidance_scale is None else req.guidance_scale, tau=d.tau, top_k=d.top_k,
                   top_p=d.top_p, pruning=pruning, pruning_label=label, output_format=fmt,
                   quality=req.output_compression, route="openai",
                   partial_images=req.partial_images if req.stream else 0)


def encoded_images(job: Job, png: PngParams = DEFAULT_PNG) -> list[bytes]:
    sp = job.spec
    return encode_all(job.images, sp.width, sp.height, sp.output_format, sp.quality, png)


def image_items(job: Job, encoded: list[bytes] | None) -> list[dict[str, Any]]:
    """Per image: seed, stats, and ``b64_json`` of its file (none with ``encoded`` None), a ``Base64``
    (the bodies below are written by ``jsonbody.dumps``)."""
    per = (job.result or {}).get("images", [])
    out = []
    for data, info in zip(encoded if encoded is not None else [None] * len(per), per, strict=True):
        st = info["stats"]
        stats = {k: st[k] for k in ("tokens_computed", "tokens_full", "uncond_stop_scale", "ideal_speedup",
                                    "kept_fraction_per_scale")}
        item = {"seed": info["seed"], "stats": {"seed": info["seed"], **stats,
                                                "prompt_truncated": info["prompt_truncated"],
                                                "text_tokens": info.get("text_tokens", 0)}}
        if data is not None:
            item["b64_json"] = Base64(data)
        out.append(item)
    return out


def job_metrics(job: Job) -> dict[str, Any]:
    r = job.result or {}
    total = (job.completed_ms - job.created_ms) / 1000 if job.completed_ms else None
    return {"queue_wait_s": r.get("queue_wait_s"), "inference_s": r.get("inference_s"), "total_s": total,
            "batch_images": r.get("batch_images")}


def job_body(job: Job, encoded: list[bytes] | None) -> dict[str, Any]:
    sp = job.spec
    ts = lambda ms: ms / 1000 if ms else None
    return {"id": job.id, "object": "job", "status": job.status, "created_at": job.created_ms / 1000,
            "started_at": ts(job.started_ms), "completed_at": ts(job.completed_ms), "width": sp.width,
            "height": sp.height, "output_format": sp.output_format, "seeds": sp.seeds, "pruning": sp.pruning_label,
            "output": image_items(job, encoded) if encoded is not None else None,
            "output_delivered": job.images_dropped, "error": job.error,
            "metrics": {**job_metrics(job), "images": [i["stats"] for i in image_items(job, None)] or None},
            "urls": {"get": f"/v1/jobs/{job.id}", "cancel": f"/v1/jobs/{job.id}/cancel"}}


STATS_HEADERS = ("x-seed", "x-queue-wait-s", "x-inference-s", "x-tokens-computed", "x-tokens-full",
                 "x-ideal-speedup", "x-uncond-stop-scale", "x-pruning")


def stats_headers(job: Job) -> dict[str, str]:
    """A raw-image response's stats (its body is the image): the first image's, as ``STATS_HEADERS``."""
    r = job.result or {}
    st = image_items(job, None)[0]["stats"]
    stop = st["uncond_stop_scale"]
    values = (st["seed"], r.get("queue_wait_s", 0.0), r.get("inference_s", 0.0), st["tokens_computed"],
              st["tokens_full"], f"{st['ideal_speedup']:.4f}", "none" if stop is None else stop,
              job.spec.pruning_label)
    return {name: str(v) for name, v in zip(STATS_HEADERS, values, strict=True)}


def generate_body(job: Job, encoded: list[bytes]) -> dict[str, Any]:
    sp = job.spec
    return {"id": job.id, "created": job.created_ms // 1000, "width": sp.width, "height": sp.height,
            "output_format": sp.output_format, "seeds": sp.seeds, "pruning": sp.pruning_label,
            "data": image_items(job, encoded), "metrics": job_metrics(job)}


def openai_body(job: Job, encoded: list[bytes], quality: str | None, urls: list[str] | None = None) -> dict[str, Any]:
    """The OpenAI response: each image as ``b64_json``, or with ``urls`` as links instead."""
    sp = job.spec
    items = image_items(job, encoded if urls is None else None)
    computed = sum(i["stats"]["tokens_computed"] for i in items)
    full = sum(i["stats"]["tokens_full"] for i in items)
    # the request's text, counted once (its n images share the prompt and negative prompt)
    text = items[0]["stats"]["text_tokens"] if items else 0
    data = ([{"b64_json": None, "url": u, "revised_prompt": None, "seed": i["seed"]}
             for i, u in zip(items, urls, strict=True)] if urls is not None else
            [{"b64_json": i["b64_json"], "url": None, "revised_prompt": None, "seed": i["seed"]} for i in items])
    return {"created": job.created_ms // 1000, "output_format": sp.output_format, "size": f"{sp.width}x{sp.height}",
            "quality": quality, "data": data,
            "usage": {"input_tokens": text, "output_tokens": computed, "total_tokens": text + computed,
                      "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
                      "output_tokens_details": {"image_tokens": computed, "image_tokens_full": full,
                                                "pruned_tokens": full - computed}},
            "metrics": {**job_metrics(job), "id": job.id, "pruning": sp.pruning_label,
                        "images": [i["stats"] for i in items]}}
