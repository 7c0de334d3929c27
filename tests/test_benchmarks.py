"""The benchmark entry points run end to end on tiny models (speed targets live in the benchmarks)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _json_lines(args: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_pruning_bench_smoke_json():
    rows = _json_lines(["-m", "pruning.bench", "--smoke", "--repeats", "1", "--sweep", "0.5", "--json"])
    by_policy = {r["policy"]: r for r in rows}
    assert {"unpruned", "ld-pruning", "lhep-only", "sats-only", "fastvar-style", "skipvar-style",
            "forced-0.5", "batch4-heterogeneous"} <= set(by_policy)
    for r in rows:
        if "speedup" in r:
            assert {"policy", "speedup", "ideal_speedup", "efficiency", "kept_fraction_per_scale"} <= set(r)
            assert r["ideal_speedup"] >= 1.0 and r["speedup"] > 0
    assert by_policy["unpruned"]["ideal_speedup"] == 1.0
    assert by_policy["forced-0.5"]["kept_fraction_per_scale"][-3:] == [0.5, 0.5, 0.5]


def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    rows = _json_lines(["benchmarks/gpu_bench.py", "--smoke", "--repeats", "1", "--json", "--profile", str(tmp_path)])
    assert [r["policy"] for r in rows][0] == "unpruned" and len(rows) == 2
    assert rows[1]["ideal_speedup"] > 1.5
    for r in rows:  # the per-scale breakdown covers the 7 scales of the smoke schedule
        assert len(r["scale_wall_ms"]) == 7 and all(w > 0 for w in r["scale_wall_ms"])
        assert sum(r["scale_wall_ms"]) < 1e3 * r["latency_s"] * 1.5
    tables = sorted(tmp_path.glob("*.txt"))
    assert len(tables) == 2 and all("Self CPU" in t.read_text() for t in tables)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_gpu_bench_graph_rows_on_cpu():
    """--graphs adds one row per policy run through the graph runner's buffers (eager on CPU), with
    the outputs compared against the plain loop; --batch runs that many prompts per generation."""
    rows = _json_lines(["benchmarks/gpu_bench.py", "--smoke", "--repeats", "1", "--json", "--graphs", "--batch", "2"])
    assert [r["policy"].endswith("[graphs]") for r in rows] == [False, False, True, True]
    for r in rows[2:]:
        assert r["same_images_as_eager"] is True and r["batch"] == 2
        assert r["graph_stats"]["failed"] == [] and r["graph_stats"]["captured"] == 0  # no capture on CPU
