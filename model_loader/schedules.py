"""Scale schedules of Infinity: aspect-ratio templates, resolutions and RoPE positions.

Data from infinity-spec.md, Appendix C (the official ``dynamic_resolution.py`` tables).
Every template has 13 token grids (h, w); a resolution key ("pn") uses a prefix of them.
The last grid of the "1M" list is the RoPE reference grid of the template, whatever pn runs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the API process uses the tables and must not import torch
    import torch

# Templates listed by h/w >= 1; the inverse ratios are the transposed grids (see _ALL_TEMPLATES).
_BASE_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
            (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28),
            (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27),
            (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26),
            (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24),
            (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23),
            (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20),
            (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18),
            (72, 24), (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = {}
    for ratio, grids in _BASE_GRIDS.items():
        out[ratio] = grids
        if ratio != 1.0:
            # the official inverse key truncates to three decimals: int(1/r*1000)/1000
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _all_templates()

# Number of scales per resolution key (pn).
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
# Square-image side in pixels of the resolution keys the service offers.
PN_BY_RESOLUTION: dict[int, str] = {1024: "1M", 512: "0.25M", 256: "0.06M"}

VAE_STRIDE = 16  # pixels per token side (the 8B's 8-pixel VAE doubles its latent grid but not the tokens)
ROPE_TABLE_SIDE = 2048 // 16  # positions are capped by a 128 x 128 table


def nearest_template(h_div_w: float) -> float:
    """The aspect template nearest to ``h_div_w`` (absolute difference, as the official code)."""
    if not h_div_w > 0:
        raise ValueError(f"h_div_w must be positive, got {h_div_w!r}")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def scale_schedule(h_div_w_template: float, pn: str) -> tuple[tuple[int, int], ...]:
    """Token grids (h, w) of one template at one resolution key."""
    if h_div_w_template not in TEMPLATES:
        raise ValueError(f"unknown aspect template {h_div_w_template!r}; known: {sorted(TEMPLATES)}")
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown pn {pn!r}; known: {sorted(PN_NUM_SCALES)}")
    return TEMPLATES[h_div_w_template][: PN_NUM_SCALES[pn]]


def template_of_schedule(grids: tuple[tuple[int, int], ...]) -> float:
    """The template whose grid list starts with ``grids`` (only official schedules are valid)."""
    grids = tuple(tuple(g) for g in grids)
    for ratio, full in TEMPLATES.items():
        if full[: len(grids)] == grids:
            return ratio
    raise ValueError(f"{grids} is not a prefix of any official scale schedule")


def image_size(grids: tuple[tuple[int, int], ...], pixels_per_token: int = VAE_STRIDE) -> tuple[int, int]:
    """Pixel (height, width) produced by a schedule (``pixels_per_token``: the preset's, 16 for official models)."""
    h, w = grids[-1]
    return h * pixels_per_token, w * pixels_per_token


@lru_cache(maxsize=64)
def rope_positions(grids: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Integer RoPE (row, col) of every token of the schedule, concatenated over scales.

    Positions are normalised to the template's "1M" final grid (rope2d_normalized_by_hw=2):
    row = round(i * H1M / h), col = round(j * W1M / w), with the product in float32 and
    round-half-to-even, exactly as the official table is built. Returns int64 (sum h*w, 2).
    """
    import torch

    ref_h, ref_w = TEMPLATES[template_of_schedule(grids)][-1]
    out = []
    for h, w in grids:
        rows = (torch.arange(h) * (ref_h / h)).round().long()
        cols = (torch.arange(w) * (ref_w / w)).round().long()
        out.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2))
    pos = torch.cat(out)
    assert int(pos.max()) < ROPE_TABLE_SIDE
    return pos


def final_grid(h_div_w_template: float, pn: str) -> tuple[int, int]:
    """Last token grid (h, w) of a template at a resolution key."""
    return scale_schedule(h_div_w_template, pn)[-1]


def scale_offsets(grids: tuple[tuple[int, int], ...]) -> list[int]:
    """Start offset of each scale in the concatenated token sequence, plus the total at the end."""
    offsets = [0]
    for h, w in grids:
        offsets.append(offsets[-1] + h * w)
    return offsets
