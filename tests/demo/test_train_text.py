"""demo.train_text: the tiny T5's pretraining learns, and writes a folder the model's text path loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demo.preset import build_demo_text_encoder
from demo.train_common import TrainArgs
from demo.train_text import train_text_encoder
from model_loader.checkpoint_io import read_safetensors
from model_loader.text_encoder import T5TextEncoder


def test_pretraining_learns_and_saves_a_loadable_encoder(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    args = TrainArgs(out=tmp_path / "run", steps=60, batch_size=32, lr=2e-3, log_every=1000)
    folder = train_text_encoder(args, eval_captions=64)
    meta = json.loads((tmp_path / "run" / "text_encoder.json").read_text())
    losses = [h["loss"] for h in meta["history"]]
    assert len(losses) == 60 and sum(losses[-5:]) < 0.6 * sum(losses[:5]), losses[:5] + losses[-5:]
    assert set(meta["reader_accuracy"]) == {"train", "heldout"}
    assert meta["reader_accuracy"]["heldout"]["empty"] >= 0.9  # which cells a caption uses is learnt first
    # the folder is what the service's text path loads, with weights that moved from the seeded start
    enc = T5TextEncoder(folder, device="cpu", dtype=torch.float32, max_length=64)
    assert enc.d_model == 256
    seeded = read_safetensors(build_demo_text_encoder(tmp_path / "seeded") / "model.safetensors")
    trained = read_safetensors(folder / "model.safetensors")
    assert seeded.keys() == trained.keys()
    assert not torch.equal(seeded["shared.weight"], trained["shared.weight"])
    feats = enc.encode(["a large red circle at the top left on a white background"]).features_BTC
    assert feats.shape[-1] == 256 and torch.isfinite(feats).all()


def test_qk_scale_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qk_scale"):
        train_text_encoder(TrainArgs(out=tmp_path, steps=1, batch_size=2, lr=1e-3), qk_scale=0)


def test_demo_weights_without_their_text_encoder_are_refused(tmp_path: Path) -> None:
    """No silent fallback to the seeded T5: the transformer was trained with another one."""
    import shutil

    from demo.model import WEIGHTS_DIR, load_demo_engine

    for name in ("vae.safetensors", "transformer.safetensors"):
        shutil.copyfile(WEIGHTS_DIR / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_demo_engine(tmp_path)
