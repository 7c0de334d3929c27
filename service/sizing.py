"""Requested size -> official aspect template and resolution key (model_loader.schedules, torch-free)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model_loader.schedules import PN_BY_RESOLUTION, VAE_STRIDE, final_grid, nearest_template

RESOLUTION_BY_PN = {v: k for k, v in PN_BY_RESOLUTION.items()}


class SizeError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ResolvedSize:
    h_div_w: float
    """The official aspect template (h / w)."""
    pn: str
    width: int
    height: int


def allowed_resolutions(tiny: bool) -> tuple[int, ...]:
    return (256, 512, 1024) if tiny else (512, 1024)


def _resolved(h_div_w: float, resolution: int) -> ResolvedSize:
    template = nearest_template(h_div_w)
    pn = PN_BY_RESOLUTION[resolution]
    h, w = final_grid(template, pn)
    return ResolvedSize(template, pn, w * VAE_STRIDE, h * VAE_STRIDE)


def parse_aspect(aspect: str) -> float:
    m = re.fullmatch(r"\s*(\d{1,4})\s*:\s*(\d{1,4})\s*", aspect)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise SizeError(f"aspect_ratio must look like '16:9', got {aspect!r}", "aspect_ratio")
    return int(m.group(2)) / int(m.group(1))


def _check_ratio(h_div_w: float, param: str) -> None:
    template = nearest_template(h_div_w)
    if abs(math.log(h_div_w / template)) > 0.1:
        raise SizeError(f"aspect h/w={h_div_w:.3f} is not near an official template (1:3 to 3:1)", param)


def resolve_size(*, width: int | None, height: int | None, aspect_ratio: str | None, resolution: int | None,
                 default_resolution: int, tiny: bool) -> ResolvedSize:
    """Map width/height, or aspect_ratio + resolution, to a template and pn; raises SizeError."""
    allowed = allowed_resolutions(tiny)
    if resolution is not None and resolution not in allowed:
        raise SizeError(f"resolution must be one of {list(allowed)} for this model, got {resolution}", "resolution")
    if (width is None) != (height is None):
        raise SizeError("give both width and height, or neither", "width" if width is None else "height")
    if width is not None and height is not None:
        if aspect_ratio is not None or resolution is not None:
            raise SizeError("give width/height or aspect_ratio/resolution, not both", "aspect_ratio")
        return _from_pixels(width, height, allowed)
    h_div_w = parse_aspect(aspect_ratio) if aspect_ratio is not None else 1.0
    _check_ratio(h_div_w, "aspect_ratio")
    return _resolved(h_div_w, resolution or default_resolution)


def _from_pixels(width: int, height: int, allowed: tuple[int, ...]) -> ResolvedSize:
    if width <= 0 or height <= 0:
        raise SizeError("width and height must be positive", "width")
    _check_ratio(height / width, "height")
    side = math.sqrt(width * height)
    resolution = min(allowed, key=lambda r: abs(math.log(side / r)))
    if abs(math.log(side / resolution)) > math.log(1.45):
        raise SizeError(f"{width}x{height} is not near a supported resolution {list(allowed)} px", "width")
    return _resolved(height / width, resolution)


def parse_openai_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not m:
        raise SizeError(f"size must be 'auto' or 'WIDTHxHEIGHT', got {size!r}", "size")
    return int(m.group(1)), int(m.group(2))
