"""Attribute checker: reads a generated image back against the attributes of its caption.

GenEval-style, but for the demo grammar. Every pixel of a 5x5 box-blurred copy is labelled with its nearest
palette colour (textures keep each pixel nearest to its own colour; see demo.dataset). Then:

* background: the most frequent label over the cells that hold no shape;
* per shape, inside its grid cell: pixels not labelled as the background are the object; it is
  present if they cover >= ``MIN_OBJECT_FRACTION`` of the cell; its colour is their most frequent
  label; its shape is the nearest prototype in a small feature space of the colour mask (fill
  ratio of the robust bounding box, relative height of the centroid, occupancy of the four
  corners of the box); its size is "large" when the box's longer side exceeds the midpoint between the prototype's small
  and large sides. Prototypes are the generator's ideal shapes read through the same pipeline.

Attributes checked: background colour, and per shape colour, shape and size (textures are not
checked). ``adherence`` is the fraction of checked attributes that are correct (in [0, 1]);
``all_correct`` is 1.0 when every one is (the GenEval-style per-image success).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .dataset import CELL, COLOURS, IMAGE_SIZE, MODEL_IMAGE_SIZE, PALETTE, SHAPES, SIZES, SceneSpec, shape_mask

MIN_OBJECT_FRACTION = 0.02
BLUR_PX = 5
_FEATURE_SCALE = np.array([0.08, 0.05, 0.15], dtype=np.float32)
"""Typical spread of (fill ratio, centroid height, corner occupancy); distances are in these units."""

_PALETTE_K3 = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float32)


def box_blur(image_HW3: np.ndarray, k: int = BLUR_PX) -> np.ndarray:
    """Mean over a k x k window (edge-padded), float32: averages pixel noise and fine texture away."""
    pad = k // 2
    x = np.pad(image_HW3.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    for axis in (0, 1):
        c = np.cumsum(x, axis=axis, dtype=np.float64)
        c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
        n = x.shape[axis] - k + 1
        x = (c.take(range(k, k + n), axis=axis) - c.take(range(n), axis=axis)) / k
    return x.astype(np.float32)


def palette_labels(image_HW3: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest palette colour of every (box-blurred) pixel, (H, W) int64."""
    px = box_blur(image_HW3)
    d_HWK = ((px[:, :, None, :] - _PALETTE_K3[None, None]) ** 2).sum(-1)
    return d_HWK.argmin(-1)


def cell_bounds(row: int, col: int) -> tuple[slice, slice]:
    y0, y1 = round(row * CELL), round((row + 1) * CELL)
    x0, x1 = round(col * CELL), round((col + 1) * CELL)
    return slice(y0, y1), slice(x0, x1)


def mask_features(mask_hw: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(fill, centroid height, corner occupancy) of a bool mask and its box's longer side; None if empty."""
    ys, xs = np.nonzero(mask_hw)
    if len(ys) < 8:
        return None
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    h, w = y1 - y0 + 1, x1 - x0 + 1
    inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    fill = inside.sum() / (h * w)
    cy = (ys[inside].mean() - y0 + 0.5) / h
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    iy0, iy1, ix0, ix1 = int(round(y0)), int(round(y1)) + 1, int(round(x0)), int(round(x1)) + 1
    box = mask_hw[iy0:iy1, ix0:ix1]
    corners = [box[:ch, :cw], box[:ch, -cw:], box[-ch:, :cw], box[-ch:, -cw:]]
    occ = float(np.mean([c.mean() for c in corners]))
    return np.array([min(fill, 1.0), cy, occ], dtype=np.float32), float(max(h, w))


@lru_cache(maxsize=1)
def shape_prototypes() -> tuple[np.ndarray, np.ndarray]:
    """Features of the generator's ideal shapes read through the same pipeline (blur, labels).

    Returns (shapes, sizes, 3) features and (shapes,) box-side thresholds between small and large.
    """
    feats, sides = [], []
    c = 1.5 * CELL
    white, black = COLOURS.index("white"), COLOURS.index("black")
    for shape in SHAPES:
        per_size = []
        for frac in SIZES.values():
            img = np.where(shape_mask(shape, c, c, frac * CELL)[..., None], PALETTE["white"], PALETTE["black"])
            labels = palette_labels(img.astype(np.uint8))[cell_bounds(1, 1)]
            assert (labels == black).any()
            per_size.append(mask_features(labels == white))
        feats.append(np.stack([f for f, _ in per_size]))
        sides.append(np.mean([side for _, side in per_size]))
    return np.stack(feats), np.asarray(sides, dtype=np.float32)


def classify_shape(features: np.ndarray, side_px: float) -> tuple[str, str]:
    """(shape, size): the nearest prototype on the shape features, then the box side against that shape's split."""
    protos, sides = shape_prototypes()
    d = (((protos - features) / _FEATURE_SCALE) ** 2).sum(-1).min(-1)
    k = int(d.argmin())
    return SHAPES[k], "large" if side_px > sides[k] else "small"


def _mode(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(COLOURS)).argmax())


def score(image_HW3_uint8: np.ndarray, attributes: SceneSpec) -> dict:
    """Per-attribute booleans, what was read, and ``adherence`` / ``all_correct`` in [0, 1]."""
    img = np.asarray(image_HW3_uint8)
    if img.shape == (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3):  # the demo model's output: read at render size
        k = IMAGE_SIZE // MODEL_IMAGE_SIZE
        img = img.repeat(k, axis=0).repeat(k, axis=1)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) or ({MODEL_IMAGE_SIZE}, {MODEL_IMAGE_SIZE}, 3) "
                         f"image, got {img.shape}")
    labels = palette_labels(img)
    used = {s.cell for s in attributes.shapes}
    empty = [labels[cell_bounds(r, c)] for r in range(3) for c in range(3) if (r, c) not in used]
    bg = _mode(np.concatenate([e.ravel() for e in empty]))
    checks: dict[str, bool] = {"background": COLOURS[bg] == attributes.background}
    read: dict[str, str | None] = {"background": COLOURS[bg]}
    for i, s in enumerate(attributes.shapes):
        cell = labels[cell_bounds(*s.cell)]
        obj = cell != bg
        colour = shape = size = None
        if obj.mean() >= MIN_OBJECT_FRACTION:
            colour_idx = _mode(cell[obj])
            colour = COLOURS[colour_idx]
            feats = mask_features(cell == colour_idx)
            if feats is not None:
                shape, size = classify_shape(*feats)
        for attr, value, want in (("colour", colour, s.colour), ("shape", shape, s.shape), ("size", size, s.size)):
            checks[f"shape{i}.{attr}"] = value == want
            read[f"shape{i}.{attr}"] = value
    n_ok = sum(checks.values())
    return {"checks": checks, "read": read, "adherence": n_ok / len(checks),
            "all_correct": float(n_ok == len(checks))}


def mean_scores(images: list[np.ndarray], scenes: list[SceneSpec]) -> dict:
    """Mean adherence and all-correct rate over a set of images, the rate of each kind of
    attribute (background, and colour / shape / size over every shape), and both again per number
    of shapes in the caption (``by_shape_count``: whether the model binds each shape's words to
    its own place shows there, as a fall from one shape to two and three)."""
    results = [score(im, sc) for im, sc in zip(images, scenes, strict=True)]
    groups: dict[int, list[dict]] = {}
    for r, sc in zip(results, scenes, strict=True):
        groups.setdefault(len(sc.shapes), []).append(r)
    return {**_summary(results),
            "by_shape_count": {n: {"images": len(rs), **_summary(rs)} for n, rs in sorted(groups.items())},
            "shape_reads": shape_confusion(results, scenes)}


def shape_confusion(results: list[dict], scenes: list[SceneSpec]) -> dict[str, dict[str, int]]:
    """Per shape kind a caption asked for, how often each kind was read in its cell (``none``: no
    object, or too few pixels of its colour to measure): whether misses are spread or all read as
    one kind (blobs read as squares or circles) shows here."""
    counts: dict[str, dict[str, int]] = {k: {} for k in SHAPES}
    for r, sc in zip(results, scenes, strict=True):
        for i, s in enumerate(sc.shapes):
            got = r["read"][f"shape{i}.shape"] or "none"
            counts[s.shape][got] = counts[s.shape].get(got, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def _summary(results: list[dict]) -> dict:
    kinds: dict[str, list[bool]] = {}
    for r in results:
        for key, ok in r["checks"].items():
            kinds.setdefault(key.rsplit(".", 1)[-1], []).append(ok)
    return {"adherence": float(np.mean([r["adherence"] for r in results])),
            "all_correct": float(np.mean([r["all_correct"] for r in results])),
            "per_attribute": {k: round(float(np.mean(v)), 4) for k, v in kinds.items()}}
