"""Fixtures of the demo tests."""

from pathlib import Path

import pytest

from demo.preset import build_demo_text_encoder
from model_loader.checkpoint_io import save_safetensors
from model_loader.configs import get_preset
from model_loader.random_init import random_model


@pytest.fixture
def random_demo_weights(tmp_path: Path) -> Path:
    """A weights folder of the demo's shapes with random weights (speed and plumbing, not quality)."""
    model = random_model(get_preset("demo"), seed=0)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_safetensors(model.transformer, weights / "transformer.safetensors")
    save_safetensors(model.vae, weights / "vae.safetensors")
    build_demo_text_encoder(weights / "text_encoder")  # any T5 serves random weights; there is no fallback
    return weights
