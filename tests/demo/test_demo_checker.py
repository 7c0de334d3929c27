"""demo.checker reads the generator's own images back, and fails on corrupted ones."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from demo.checker import mean_scores, score
from demo.dataset import COLOURS, PALETTE, make_split
from model_loader.vae import image_to_uint8


def test_generator_images_score_high() -> None:
    samples = make_split(200, seed=11) + make_split(40, seed=11, split="heldout")
    m = mean_scores([s.image_HW3 for s in samples], [s.attributes for s in samples])
    assert m["adherence"] >= 0.95 and m["all_correct"] >= 0.9


def test_model_size_images_score_high() -> None:
    """The 128-px images the demo model learns (2x2 means of the render) read back as well."""
    samples = make_split(120, seed=13) + make_split(30, seed=13, split="heldout")
    small = [image_to_uint8(s.model_image_3HW[None])[0].numpy() for s in samples]
    assert small[0].shape == (128, 128, 3)
    m = mean_scores(small, [s.attributes for s in samples])
    assert m["adherence"] >= 0.95 and m["all_correct"] >= 0.9


def test_corrupted_images_score_low() -> None:
    samples = make_split(40, seed=12)
    blank = [score(np.full_like(s.image_HW3, 128), s.attributes)["adherence"] for s in samples]
    assert np.mean(blank) < 0.2
    for s in samples:  # the right background and no shapes: only the background attribute holds
        plain = np.zeros_like(s.image_HW3) + np.asarray(PALETTE[s.attributes.background], np.uint8)
        r = score(plain, s.attributes)
        assert r["checks"]["background"] and r["adherence"] == 1 / len(r["checks"])
    swapped = []
    for s in samples:  # the same image judged against a caption with every colour changed
        wrong = tuple(replace(x, colour=next(c for c in COLOURS if c not in (x.colour, s.attributes.background)))
                      for x in s.attributes.shapes)
        swapped.append(score(s.image_HW3, replace(s.attributes, shapes=wrong)))
        assert not any(v for k, v in swapped[-1]["checks"].items() if k.endswith(".colour"))
    assert np.mean([r["all_correct"] for r in swapped]) == 0.0
    shuffled = [score(a.image_HW3, b.attributes)["adherence"] for a, b in zip(samples, samples[1:], strict=False)]
    assert np.mean(shuffled) < 0.6


def test_by_shape_count_shows_swapped_bindings() -> None:
    """Captions whose shapes trade colours (the same words, bound to other places) fail colour in
    the two- and three-shape groups only, while every group of the true captions stays high."""
    samples = make_split(90, seed=14)
    true = mean_scores([s.image_HW3 for s in samples], [s.attributes for s in samples])["by_shape_count"]
    assert sorted(true) == [1, 2, 3] and sum(g["images"] for g in true.values()) == 90
    assert all(g["per_attribute"]["colour"] >= 0.95 for g in true.values())
    rotated = []
    for s in samples:  # shape i gets the colour of shape i+1 (a single shape keeps its own)
        sh = s.attributes.shapes
        rotated.append(replace(s.attributes, shapes=tuple(
            replace(x, colour=sh[(i + 1) % len(sh)].colour) for i, x in enumerate(sh))))
    by_n = mean_scores([s.image_HW3 for s in samples], rotated)["by_shape_count"]
    assert by_n[1]["per_attribute"]["colour"] >= 0.95
    for n in (2, 3):  # colours can repeat across shapes, so a few still match
        assert by_n[n]["per_attribute"]["colour"] <= 0.3, by_n[n]


def test_shape_reads_count_what_was_read_per_asked_kind() -> None:
    """On the generator's images the counts sit on the diagonal; judged against captions that ask
    for the next kind of shape, the same reads move off it, onto the kind that was drawn."""
    from demo.dataset import SHAPES

    samples = make_split(60, seed=15)
    images = [s.image_HW3 for s in samples]
    true = mean_scores(images, [s.attributes for s in samples])["shape_reads"]
    n_shapes = sum(len(s.attributes.shapes) for s in samples)
    assert sum(sum(v.values()) for v in true.values()) == n_shapes
    assert sum(true[k].get(k, 0) for k in SHAPES) >= 0.95 * n_shapes
    nxt = {k: SHAPES[(i + 1) % len(SHAPES)] for i, k in enumerate(SHAPES)}
    asked = [replace(s.attributes, shapes=tuple(replace(x, shape=nxt[x.shape]) for x in s.attributes.shapes))
             for s in samples]
    moved = mean_scores(images, asked)["shape_reads"]
    assert sum(moved[k].get(k, 0) for k in SHAPES) <= 0.05 * n_shapes
    prev = {v: k for k, v in nxt.items()}
    assert sum(moved[k].get(prev[k], 0) for k in SHAPES) >= 0.95 * n_shapes
