"""Requested size -> official aspect template and resolution key (model_loader.schedules, torch-free)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model_loader.schedules import final_grid, nearest_template


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


@dataclass(frozen=True)
class ModelSizes:
    """What a model can draw: its resolution keys, the default one, and pixels per token side."""

    pns: tuple[str, ...]
    default_pn: str
    pixels_per_token: int = 16

    def resolution(self, pn: str) -> int:
        """Square side in pixels of a resolution key (1024 for "1M" on the official models)."""
        return final_grid(1.0, pn)[0] * self.pixels_per_token

    @property
    def resolutions(self) -> dict[int, str]:
        return {self.resolution(pn): pn for pn in self.pns}


def _resolved(h_div_w: float, pn: str, sizes: ModelSizes) -> ResolvedSize:
    template = nearest_template(h_div_w)
    h, w = final_grid(template, pn)
    return ResolvedSize(template, pn, w * sizes.pixels_per_token, h * sizes.pixels_per_token)


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
                 sizes: ModelSizes) -> ResolvedSize:
    """Map width/height, or aspect_ratio + resolution, to a template and pn; raises SizeError."""
    allowed = sizes.resolutions
    if resolution is not None and resolution not in allowed:
        raise SizeError(f"resolution must be one of {sorted(allowed)} for this model, got {resolution}", "resolution")
    if (width is None) != (height is None):
        raise SizeError("give both width and height, or neither", "width" if width is None else "height")
    if width is not None and height is not None:
        if aspect_ratio is not None or resolution is not None:
            raise SizeError("give width/height or aspect_ratio/resolution, not both", "aspect_ratio")
        return _from_pixels(width, height, sizes)
    h_div_w = parse_aspect(aspect_ratio) if aspect_ratio is not None else 1.0
    _check_ratio(h_div_w, "aspect_ratio")
    return _resolved(h_div_w, allowed[resolution] if resolution is not None else sizes.default_pn, sizes)


def _from_pixels(width: int, height: int, sizes: ModelSizes) -> ResolvedSize:
    allowed = sizes.resolutions
    if width <= 0 or height <= 0:
        raise SizeError("width and height must be positive", "width")
    _check_ratio(height / width, "height")
    side = math.sqrt(width * height)
    resolution = min(allowed, key=lambda r: abs(math.log(side / r)))
    if abs(math.log(side / resolution)) > math.log(1.45):
        raise SizeError(f"{width}x{height} is not near a supported resolution {sorted(allowed)} px", "width")
    return _resolved(height / width, allowed[resolution], sizes)


def parse_openai_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not m:
        raise SizeError(f"size must be 'auto' or 'WIDTHxHEIGHT', got {size!r}", "size")
    return int(m.group(1)), int(m.group(2))
