"""demo.text_probe: the binding probe separates features that bind from features that do not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from demo.dataset import draw_attributes
from demo.preset import DEMO_PRESET, build_demo_text_encoder
from demo.text_probe import probe_report, scene_targets
from model_loader.text_encoder import T5TextEncoder


def test_scene_targets_name_each_cell() -> None:
    scenes = [draw_attributes(0, i, "train") for i in range(20)]
    t = scene_targets(scenes)
    for b, scene in enumerate(scenes):
        for v in t.per_cell().values():
            assert int((v[b] > 0).sum()) == len(scene.shapes)
    sub = t.take(torch.tensor([3, 1]))
    assert torch.equal(sub.colour_BN[1], t.colour_BN[1]) and sub.background_B.shape == (2,)


def test_probe_reads_positions_but_not_a_bag_of_words(tmp_path: Path) -> None:
    """With absolute positions a small reader names held-out shapes' colours far better than from
    context-free word embeddings, where it can only guess which colour word is whose."""
    build_demo_text_encoder(tmp_path / "t5")
    enc = T5TextEncoder(tmp_path / "t5", device="cpu", dtype=torch.float32,
                        max_length=DEMO_PRESET.transformer.text_maxlen)
    r = probe_report(enc, steps=300, train_captions=3000, test_captions=300, batch=64,
                     names=["embed", "embed+pos"])
    bound, bag = r["embed+pos"]["heldout"], r["embed"]["heldout"]
    assert bound["colour"] >= bag["colour"] + 0.08, r  # 0.367 against 0.235 at these settings
    assert bound["empty"] >= 0.9 and bag["empty"] >= 0.9, r  # which cells are used is stated either way
    with pytest.raises(ValueError, match="steps"):
        probe_report(enc, steps=0)
    with pytest.raises(ValueError, match="names"):
        probe_report(enc, steps=1, names=["bag"])
