"""Request and response models of the public API (OpenAPI schema source)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..spec import OutputFormat

MAX_PROMPT = 32_000  # hard schema bound; the configured max_prompt_chars is checked per request


PresetName = Annotated[str, StringConstraints(min_length=1, max_length=32)]


class PruningOptions(BaseModel):
    """Explicit LD-Pruning settings on top of a preset (default: the server's default preset).
    Strict types: ``"no"`` is not a boolean, ``"0.5"`` not a number."""

    model_config = ConfigDict(extra="forbid", strict=True)

    preset: PresetName | None = Field(None, description="off | light | quality | balanced | fast")
    energy_keep_ratio: float | None = Field(None, gt=0, le=1, description="rho: high-frequency energy to keep")
    uncond_stop_tol: float | None = Field(None, ge=0, le=10, description="delta: SATS stop tolerance")
    lhep: bool | None = Field(None, description="Enable latent high-frequency energy pruning")
    sats: bool | None = Field(None, description="Enable semantic-adaptive termination of the uncond branch")
    fill_mode: Literal["zero", "nearest"] | None = Field(
        None, description="Tokens LHEP skips add nothing (zero, default) or repeat the previous residual "
                          "upsampled (nearest, the paper's fill)")
    lhep_last_scales: int | None = Field(
        None, ge=1, le=12, description="LHEP on this many last scales (default: the fewest holding 70% of the "
                                       "tokens: 3 at 512-1024 px, 2 at 256 px)")
    energy_smoothing: Literal["auto", "always", "never"] | None = Field(
        None, description="3x3 average of the energy map: always (the paper), never, or auto (default: maps of "
                          "8+ cells a side)")
    token_score: Literal["energy", "energy+entropy"] | None = Field(
        None, description="Which tokens LHEP computes: the highest-energy ones (energy, the paper's, default), or "
                          "as many ranked by energy rank + the rank of their bits' latest entropy")


PruningField = PresetName | PruningOptions | None


class SamplingFields(BaseModel):
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Random if absent; image i uses seed + i")
    guidance_scale: float | None = Field(None, ge=0, le=20)
    pruning: PruningField = Field(None, description="A preset name or explicit settings")


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    width: int | None = Field(None, ge=1, le=8192)
    height: int | None = Field(None, ge=1, le=8192)
    aspect_ratio: str | None = Field(None, max_length=16, description="e.g. '16:9' (width:height)")
    resolution: Literal[128, 256, 512, 1024] | None = Field(
        None, description="Square side in pixels: 512 or 1024 for the official models, 128 for the demo "
        "model, 256/512/1024 for the tiny test models. Default: the model's native resolution")
    temperature: float | None = Field(None, gt=0, le=5)
    top_k: int | None = Field(None, ge=0, le=100_000)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    output_format: OutputFormat = "png"
    quality: int | None = Field(None, ge=1, le=100, description="jpeg/webp quality (default 90)")
    partial_images: int = Field(0, ge=0, le=3, description="Previews per image, sent as `partial_image` events "
                                "of GET /v1/jobs/{id}/events (the codes of the scales so far, decoded)")


class ImageStats(BaseModel):
    seed: int
    tokens_computed: int
    tokens_full: int
    uncond_stop_scale: int | None
    ideal_speedup: float
    kept_fraction_per_scale: list[float]
    prompt_truncated: bool
    text_tokens: int = Field(0, description="Tokens of text the encoder read for this image: its prompt (after "
                             "truncation, with the end token), plus its negative prompt when it has one")


class JobMetrics(BaseModel):
    queue_wait_s: float | None = None
    inference_s: float | None = None
    total_s: float | None = None
    batch_images: int | None = None


class JobReadMetrics(JobMetrics):
    images: list[ImageStats] | None = Field(None, description="Each image's stats once the job succeeded "
                                            "(kept after a synchronous response delivered the images)")


class GeneratedImage(BaseModel):
    b64_json: str
    seed: int
    stats: ImageStats


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobUrls(BaseModel):
    get: str
    cancel: str


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "processing", "succeeded", "failed", "canceled", "expired"]
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    width: int
    height: int
    output_format: OutputFormat
    seeds: list[int]
    pruning: str
    output: list[GeneratedImage] | None = None
    output_delivered: bool = False
    """The synchronous response that ran this job returned its images; they are not kept (output null)."""
    error: ErrorBody | None = None
    metrics: JobReadMetrics
    urls: JobUrls


class GenerateResponse(BaseModel):
    id: str
    created: int
    width: int
    height: int
    output_format: OutputFormat
    seeds: list[int]
    pruning: str
    data: list[GeneratedImage]
    metrics: JobMetrics


class OpenAIImageRequest(SamplingFields):
    """OpenAI Images API request plus the extensions seed, negative_prompt, guidance_scale, pruning.
    Unknown parameters are refused (400 ``unknown_parameter``), as OpenAI refuses them: a misspelt
    extension (``negative_promt``) would otherwise be dropped without a word."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    model: str | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=16)
    size: str | None = Field(None, max_length=16, description="'auto' or 'WIDTHxHEIGHT'")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    user: str | None = Field(None, max_length=256)
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for compatibility; no effect")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted for compatibility; no effect")
    stream: bool = Field(False, description="Answer server-sent events: image_generation.partial_image, then "
                         "image_generation.completed per image")
    partial_images: int = Field(0, ge=0, le=3, description="With stream: previews per image")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    """The image (``response_format`` ``b64_json``, the default)."""
    url: str | None = None
    """``response_format`` ``url``: a signed link, valid without an API key until the job's record
    expires (``job_ttl_s`` after it finished)."""
    revised_prompt: str | None = None
    seed: int


class OpenAIUsage(BaseModel):
    input_tokens: int = Field(0, description="Text tokens of the request's prompt and negative prompt, counted once")
    output_tokens: int = Field(description="Image tokens computed (after pruning), all images")
    total_tokens: int
    input_tokens_details: dict[str, int] | None = None
    output_tokens_details: dict[str, int]


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat
    size: str
    quality: str | None = None
    usage: OpenAIUsage
    metrics: dict[str, Any]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
