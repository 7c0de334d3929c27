"""Procedural text-to-image data for the demo model: coloured, textured shapes on a 3x3 grid.

Every sample is drawn from its own seeded generator (``seed``, ``split``, ``index``), so a split
is deterministic, random-access and independent of how many samples are asked for. Grammar::

    caption := "a" shape_phrase ("," "a" shape_phrase)* "and a" shape_phrase "on a" bg_phrase
    shape_phrase := size colour [texture] shape "at the" position
    bg_phrase := colour [texture] "background"

e.g. "a large red circle at the top left and a small blue striped square at the center on a
white background". Textures ("striped", "checkered", "noisy") alternate the colour with a
greyer shade of itself (or add pixel noise), so they add high-frequency detail that the detail
scales must reproduce while every textured pixel stays nearest to its own palette colour.

Held-out split: the (shape, colour) pairs in ``HELDOUT_SHAPE_COLOUR`` and the (shape, position)
pairs in ``HELDOUT_SHAPE_POSITION`` never occur in a "train" image; every "heldout" image has at
least one shape with such a pair (its other shapes are unconstrained).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Split = Literal["train", "heldout"]
IMAGE_SIZE = 256
"""Side of the rendered image."""
MODEL_IMAGE_SIZE = 128
"""Side the demo model draws: the render averaged over 2x2 pixels (anti-aliased edges)."""
CELL = IMAGE_SIZE / 3

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 0.24, "large": 0.40}
"""Half-extent of a shape as a fraction of the cell side (85.3 px)."""
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "noisy")
SHAPE_TEXTURE_P = (0.55, 0.15, 0.15, 0.15)
BG_TEXTURE_P = (0.7, 0.1, 0.1, 0.1)
BG_COLOURS: tuple[str, ...] = ("white", "black", "blue", "green", "yellow", "purple")
POSITIONS: tuple[str, ...] = ("top left", "top center", "top right", "center left", "center", "center right",
                              "bottom left", "bottom center", "bottom right")
"""Row-major: position index p sits in grid row p // 3, column p % 3."""

HELDOUT_SHAPE_COLOUR: frozenset[tuple[str, str]] = frozenset({
    ("circle", "green"), ("square", "purple"), ("triangle", "orange"), ("star", "red"), ("cross", "blue"),
})
HELDOUT_SHAPE_POSITION: frozenset[tuple[str, str]] = frozenset({("triangle", "center"), ("star", "top left")})


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    texture: str
    position: str

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the grid cell."""
        p = POSITIONS.index(self.position)
        return p // 3, p % 3

    @property
    def heldout(self) -> bool:
        return ((self.shape, self.colour) in HELDOUT_SHAPE_COLOUR
                or (self.shape, self.position) in HELDOUT_SHAPE_POSITION)

    def phrase(self) -> str:
        tex = "" if self.texture == "plain" else f" {self.texture}"
        return f"a {self.size} {self.colour}{tex} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class SceneSpec:
    """The structured attributes a caption states (what ``demo.checker`` reads back)."""

    shapes: tuple[ShapeSpec, ...]
    background: str
    bg_texture: str = "plain"

    def caption(self) -> str:
        phrases = [s.phrase() for s in self.shapes]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        tex = "" if self.bg_texture == "plain" else f" {self.bg_texture}"
        return f"{body} on a {self.background}{tex} background"


@dataclass
class Sample:
    caption: str
    attributes: SceneSpec
    image_HW3: np.ndarray
    """uint8 RGB (256, 256, 3)."""

    @property
    def image_3HW(self) -> torch.Tensor:
        """float32 in [-1, 1], (3, 256, 256)."""
        return torch.from_numpy(self.image_HW3).permute(2, 0, 1).float().div(127.5).sub(1.0)

    @property
    def model_image_3HW(self) -> torch.Tensor:
        """What the demo model learns to draw: float32 in [-1, 1], (3, 128, 128), the 2x2 mean of the render."""
        return downsample(self.image_3HW[None])[0]


def vocabulary() -> list[str]:
    """Every word a caption can use (for the demo's tiny T5 tokenizer), in a fixed order."""
    words = ["a", "at", "the", "and", "on", "background", ","]
    words += list(COLOURS) + list(SHAPES) + list(SIZES) + [t for t in TEXTURES if t != "plain"]
    for p in POSITIONS:
        words += [w for w in p.split() if w not in words]
    return list(dict.fromkeys(words))


# ----------------------------------------------------------------------------- sampling

def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"demo:{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw_scene(rng: np.random.Generator) -> SceneSpec:
    background = str(rng.choice(BG_COLOURS))
    n = int(rng.integers(1, 4))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    shapes = []
    for cell in cells:
        colour = str(rng.choice([c for c in COLOURS if c != background]))
        shapes.append(ShapeSpec(shape=str(rng.choice(SHAPES)), colour=colour, size=str(rng.choice(list(SIZES))),
                                texture=str(rng.choice(TEXTURES, p=SHAPE_TEXTURE_P)), position=POSITIONS[cell]))
    return SceneSpec(tuple(shapes), background, str(rng.choice(TEXTURES, p=BG_TEXTURE_P)))


def draw_attributes(seed: int, index: int, split: Split = "train") -> SceneSpec:
    """The scene of sample ``index`` of a split: rejection sampling from the full grammar."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = _rng(seed, split, index)
    while True:
        scene = _draw_scene(rng)
        has_heldout = any(s.heldout for s in scene.shapes)
        if has_heldout == (split == "heldout"):
            return scene


# ----------------------------------------------------------------------------- rendering

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _polygon_mask(dx: np.ndarray, dy: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd ray casting of points (dx, dy) against a closed polygon (V, 2)."""
    inside = np.zeros(dx.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        crosses = (y0 > dy) != (y1 > dy)
        x_at = x0 + (dy - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (dx < x_at)
    return inside


FULL = (slice(0, IMAGE_SIZE), slice(0, IMAGE_SIZE))
"""The whole canvas as a (rows, cols) window."""


def shape_mask(shape: str, cx: float, cy: float, r: float,
               window: tuple[slice, slice] = FULL) -> np.ndarray:
    """Bool mask of one shape of half-extent r centred at (cx, cy) over ``window`` of the canvas
    (the whole 256 x 256 by default); every shape lies within r of its centre."""
    dx, dy = _XX[window] - cx, _YY[window] - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base the full width: fills half its bounding box
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = 0.34 * r  # half-width of each arm (arm width 0.34 of the side)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "star":  # five points, apex up, inner radius 0.45 r; centred on its bounding box
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        verts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        verts[:, 1] -= (verts[:, 1].max() + verts[:, 1].min()) / 2
        verts *= r / verts[:, 0].max()  # as wide as the other shapes
        return _polygon_mask(dx, dy, verts)
    raise ValueError(f"unknown shape {shape!r}")


def _shade(colour: str) -> np.ndarray:
    """The texture's second colour: the palette colour moved 35% toward mid grey."""
    return np.asarray(PALETTE[colour], np.float32) * 0.65 + 0.35 * 128.0


def _texture(texture: str, colour: str, rng: np.random.Generator,
             window: tuple[slice, slice] = FULL) -> np.ndarray:
    """Float (h, w, 3) fill of a texture over ``window`` of the canvas (the pattern is laid on the
    whole canvas, and the random numbers drawn are the whole canvas's, whatever the window)."""
    xx, yy = _XX[window], _YY[window]
    base = np.asarray(PALETTE[colour], np.float32)
    out = np.broadcast_to(base, (*xx.shape, 3)).copy()
    if texture == "striped":
        period = int(rng.integers(6, 11))
        alt = ((xx + yy).astype(np.int64) // (period // 2)) % 2 == 1 if rng.random() < 0.5 else \
            (yy.astype(np.int64) // (period // 2)) % 2 == 1
        out[alt] = _shade(colour)
    elif texture == "checkered":
        side = int(rng.integers(4, 9))
        alt = ((xx.astype(np.int64) // side) + (yy.astype(np.int64) // side)) % 2 == 1
        out[alt] = _shade(colour)
    elif texture == "noisy":
        out += rng.normal(0.0, 22.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)[window]
    elif texture != "plain":
        raise ValueError(f"unknown texture {texture!r}")
    return out


def _window(cx: float, cy: float, r: float) -> tuple[slice, slice]:
    """Rows and columns of the canvas whose pixel centres can lie within r of (cx, cy)."""
    def side(c: float) -> slice:
        return slice(max(0, math.floor(c - r) - 1), min(IMAGE_SIZE, math.ceil(c + r) + 1))
    return side(cy), side(cx)


def render(scene: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 (256, 256, 3) RGB image of a scene; ``rng`` draws jitter and texture phases. Each
    shape is drawn in its own window of the canvas (the same pixels as over the whole canvas, a
    tenth of the work)."""
    img = _texture(scene.bg_texture, scene.background, rng)
    for s in scene.shapes:
        row, col = s.cell
        r = SIZES[s.size] * CELL
        slack = CELL / 2 - r - 2  # keep the shape inside its cell
        cx = (col + 0.5) * CELL + rng.uniform(-0.4, 0.4) * slack
        cy = (row + 0.5) * CELL + rng.uniform(-0.4, 0.4) * slack
        window = _window(cx, cy, r)
        mask = shape_mask(s.shape, cx, cy, r, window)
        img[window][mask] = _texture(s.texture, s.colour, rng, window)[mask]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_sample(seed: int, index: int, split: Split = "train") -> Sample:
    scene = draw_attributes(seed, index, split)
    img = render(scene, _rng(seed, f"{split}:render", index))
    return Sample(scene.caption(), scene, img)


def make_split(n: int, seed: int, split: Split = "train", start: int = 0) -> list[Sample]:
    """Samples ``start .. start+n-1`` of a split (the same index always gives the same sample)."""
    return [make_sample(seed, i, split) for i in range(start, start + n)]


def downsample(img_B3HW: torch.Tensor) -> torch.Tensor:
    """Render side -> model side by averaging blocks of pixels."""
    k = img_B3HW.shape[-1] // MODEL_IMAGE_SIZE
    return torch.nn.functional.avg_pool2d(img_B3HW, k) if k > 1 else img_B3HW


def batch_tensors(samples: list[Sample], model_size: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(images (B, 3, 128, 128) float in [-1, 1] (256 px with ``model_size=False``), captions)."""
    img_B3HW = torch.stack([s.image_3HW for s in samples])
    return (downsample(img_B3HW) if model_size else img_B3HW), [s.caption for s in samples]
