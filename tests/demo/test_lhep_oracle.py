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


def test_given_keep_computes_exactly_the_tokens_given(random_demo_weights):
    from benchmarks.lhep_oracle import GivenKeep
    from demo.model import load_demo_engine
    from model_loader.sampling import SamplingParams
    from model_loader.schedules import scale_schedule
    from pruning.loop import generate

    engine = load_demo_engine(random_demo_weights)
    grids = scale_schedule(1.0, engine.preset.pn)
    text, _ = engine.encode(["a red circle top left on a blue background"] * 2)
    params = [SamplingParams(cfg=3.0, seed=s) for s in range(2)]
    last = len(grids) - 1
    keep = {last - 1: torch.tensor([0, 5, 17]), last: torch.arange(0, grids[-1][0] * grids[-1][1], 3)}
    out = generate(engine.model, text, grids, params, [GivenKeep(keep), GivenKeep({})])
    assert [s.tokens_computed for s in out.stats[0].scales[-2:]] == [3, keep[last].numel()]
    assert all(s.tokens_computed == s.tokens_full for s in out.stats[1].scales)  # nothing given: unpruned
    assert all(s.uncond_ran for s in out.stats[0].scales)


def test_cli_prune_rows_compare_selections_at_equal_counts(tmp_path, random_demo_weights):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lhep_oracle", "--weights", str(random_demo_weights),
                           "--prompts", "2", "--seeds", "1", "--prune", "--count-factor", "2", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"LDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["selection"]: r for r in (json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{"))}
    assert set(rows) == {"unpruned", "lhep energy", "oracle", "random", "oracle, 2x tokens", "random, 2x tokens"}
    lhep = rows["lhep energy"]
    assert set(lhep["kept_fraction"]) == {"5", "6"}  # the demo's default LHEP set: its last 2 of 7 scales
    for name in ("oracle", "random"):  # the same counts as LHEP's, so the same FLOPs
        assert rows[name]["kept_fraction"] == lhep["kept_fraction"]
        assert rows[name]["ideal_speedup"] == lhep["ideal_speedup"]
    for s, f in lhep["kept_fraction"].items():
        assert rows["oracle, 2x tokens"]["kept_fraction"][s] == pytest.approx(min(2 * f, 1.0), abs=0.01)
    assert rows["oracle, 2x tokens"]["ideal_speedup"] < lhep["ideal_speedup"]
    for r in rows.values():
        assert r["images"] == 2 and 0.0 <= r["adherence"] <= 1.0
