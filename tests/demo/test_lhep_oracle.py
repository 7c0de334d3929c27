"""benchmarks.lhep_oracle: the oracle is the pixel change of removing one token, and the ceiling of every ranking."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.lhep_oracle import oracle_scores, share_of_top, spearman
from model_loader.configs import get_preset
from model_loader.random_init import random_model
from model_loader.vae import resize_codes

ROOT = Path(__file__).resolve().parents[2]


def test_share_of_top_and_spearman_hand_examples():
    oracle = torch.tensor([0.0, 6.0, 1.0, 3.0])
    assert share_of_top(torch.tensor([4.0, 3.0, 2.0, 1.0]), oracle, 2) == pytest.approx(0.6)  # tokens 0, 1
    assert share_of_top(oracle, oracle, 2) == pytest.approx(0.9)  # the oracle's own top 2: tokens 1, 3
    assert spearman(oracle, oracle) == pytest.approx(1.0) and spearman(-oracle, oracle) == pytest.approx(-1.0)


@torch.inference_mode()
def test_oracle_is_the_decoded_change_of_removing_each_token():
    vae = random_model(get_preset("demo"), seed=3).vae
    torch.manual_seed(0)
    summed = torch.randn(1, vae.bits, 16, 16) * 0.3
    residual = torch.zeros(summed.shape[1], 8, 8)  # an 8x8 scale, upsampled to the 16x16 latent
    residual[:, 1, 2] = 0.5
    residual[:, 6, 0] = -0.5
    scores = oracle_scores(vae, summed, residual, (16, 16), vae_scale=1, chunk=7)
    assert scores.shape == (64,)
    nonzero = torch.nonzero(scores > 1e-6).flatten().tolist()
    assert nonzero == [1 * 8 + 2, 6 * 8 + 0]  # only the two tokens with a residual change the image
    only = torch.zeros_like(residual)
    only[:, 6, 0] = residual[:, 6, 0]
    up = resize_codes(only[None], (16, 16))  # as the latent accumulates an 8x8 scale
    direct = ((vae.decode(summed - up) - vae.decode(summed)) ** 2).sum()
    assert scores[48] == pytest.approx(float(direct), rel=1e-4)


def test_cli_rows_oracle_is_the_ceiling(tmp_path, random_demo_weights):
    weights = random_demo_weights
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lhep_oracle", "--weights", str(weights), "--prompts", "2",
                           "--seeds", "1", "--scales", "2", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"LDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert {(r["scale"], r["scorer"]) for r in rows} == {
        (s, n) for s in (5, 6) for n in ("oracle", "lhep smoothed (paper)", "lhep unsmoothed", "fastvar distance",
                                         "random")}
    for s in (5, 6):
        by = {r["scorer"]: r for r in rows if r["scale"] == s}
        assert by["oracle"]["spearman"] == pytest.approx(1.0)
        for r in by.values():
            assert r["images"] == 2
            for k in ("share_top_25", "share_top_50"):
                assert 0.0 <= r[k] <= by["oracle"][k] + 1e-9  # no ranking holds more than the oracle's own
        assert 0 < by["lhep unsmoothed"]["rho05_keep_fraction"] <= 1
