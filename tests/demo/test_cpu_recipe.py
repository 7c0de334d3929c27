"""demo/cpu_recipe.sh, the one-command CPU recipe, end to end at a few steps per stage: every stage's
command line is valid, each stage's files reach the next, and the export loads and draws. (What the
recipe's 90 minutes teach is measured in demo/README.md, not here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from demo.model import load_demo_engine
from model_loader.configs import get_preset
from model_loader.sampling import SamplingParams
from pruning.engine import ImageRequest, grids_for

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_recipe_runs_every_stage_and_its_export_draws(tmp_path: Path) -> None:
    env = {**os.environ, "PY": sys.executable, "TEXT_MIN": "0.01", "VAE1_STEPS": "2", "VAE2_STEPS": "2",
           "TF_MIN": "0.01", "TF_BATCH": "2"}
    r = subprocess.run(["bash", "demo/cpu_recipe.sh", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for said in ("text encoder, 0.01 min", "VAE, 2 + 2 steps", "transformer, 0.01 min", "done"):
        assert said in r.stdout, r.stdout

    def log(path: str) -> dict:
        return json.loads((tmp_path / path).read_text())

    assert log("text/text_encoder.json")["steps_done"] == 20  # the time budget's probe, then the budget is spent
    assert log("vae1/vae.json")["steps_done"] == 2 and log("model/vae.json")["steps_done"] == 2
    assert log("model/vae.json")["args"]["extra"]["init"] == str(tmp_path / "vae1" / "vae.safetensors")
    tf = log("model/transformer.json")
    assert tf["steps_done"] == 20
    assert {k: tf["args"]["extra"][k] for k in ("per_scale_loss", "flip_max", "last_scale_weight", "amp")} == \
        {"per_scale_loss": True, "flip_max": 0.15, "last_scale_weight": 3.0, "amp": "bf16"}
    assert torch.load(tmp_path / "model" / "transformer.ckpt", weights_only=True)["step"] == 20
    # the transformer was conditioned on the pretrained T5, and the export carries that T5
    t5 = (tmp_path / "text" / "text_encoder" / "model.safetensors").read_bytes()
    assert (tmp_path / "export" / "text_encoder" / "model.safetensors").read_bytes() == t5

    engine = load_demo_engine(tmp_path / "export")
    preset = get_preset("demo")
    d = preset.sampling
    req = ImageRequest("a red circle at the top left", SamplingParams(cfg=d.cfg, tau=d.tau, top_k=d.top_k,
                                                                       top_p=d.top_p, seed=0), None)
    (out,) = engine.generate([req], grids_for(1.0, preset.pn))
    assert out.image_HW3.shape == (128, 128, 3)
