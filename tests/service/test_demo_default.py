"""`ldserve serve` on its embedded defaults serves the shipped demo model, which draws what the prompt says."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from demo.checker import palette_labels
from demo.dataset import BG_COLOURS, COLOURS

from .conftest import base_env, serving


@pytest.fixture(scope="module")
def demo_serve(redis_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    env = base_env(redis_url, f"demo{uuid.uuid4().hex[:6]}", max_batch_size=4)
    del env["LDSERVE_MODEL_PRESET"]  # the embedded default
    with serving("serve", env, tmp_path_factory.mktemp("demo"), timeout=180) as p:
        yield p


def test_default_model_is_the_trained_demo(demo_serve) -> None:  # noqa: ANN001
    """The background a caption asks for is the one drawn (a random-weight model gets ~1 in 8 by chance)."""
    models = httpx.get(f"{demo_serve.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == "demo"
    right = []
    for i, bg in enumerate(BG_COLOURS):
        r = httpx.post(f"{demo_serve.url}/generate", timeout=120,
                       json={"prompt": f"a large red circle at the center on a {bg} background", "seed": 100 + i})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == (128, 128) and body["pruning"] == "light"  # the demo's default
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))
        right.append(COLOURS[np.bincount(palette_labels(img).ravel(), minlength=len(COLOURS)).argmax()] == bg)
    assert sum(right) >= 5, right


def test_demo_weights_are_small() -> None:
    root = Path(__file__).resolve().parents[2] / "demo" / "weights"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert 0 < total <= 30_000_000
