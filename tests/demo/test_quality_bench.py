"""benchmarks.quality runs end to end on a demo-shaped model (random weights: speed and plumbing only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quality_benchmark_writes_rows_and_charts(tmp_path, random_demo_weights):
    weights = random_demo_weights
    out = tmp_path / "out"
    asked = ["ld-pruning (balanced)", "fastvar-style", "skipvar-style", "fill nearest (paper)", "ld last 3, smoothed"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--weights", str(weights), "--prompts", "2",
                           "--seeds", "1", "--out", str(out), "--json", *(a for p in asked for a in ("--policy", p))],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"LDSERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["policy"]: r for r in map(json.loads, (ln for ln in proc.stdout.splitlines() if ln.startswith("{")))}
    assert set(rows) == {"unpruned", *asked}  # the policies asked for, and the reference
    assert rows["unpruned"]["psnr_db"] == 99.0 and rows["unpruned"]["ssim"] == 1.0  # identical to itself
    assert rows["unpruned"]["adherence_delta"] == 0.0 == rows["unpruned"]["adherence_delta_se"]
    assert rows["fastvar-style"]["ideal_speedup"] > 1.5
    for r in rows.values():
        assert 0.0 <= r["adherence"] <= 1.0 and r["images"] == 2
        assert r["adherence_delta"] == pytest.approx(r["adherence"] - rows["unpruned"]["adherence"], abs=2e-4)
        assert r["adherence_delta_se"] >= 0
    assert (out / "speedup_vs_psnr.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--weights", str(weights), "--policy", "turbo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown --policy ['turbo']" in bad.stderr
