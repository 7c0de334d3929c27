"""deploy/dashboard_metrics.py on handwritten inputs, and the panels the shipped dashboard must have.
The dashboard's metric names are checked against a live service in tests/service/test_dashboard_live.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deploy_helpers import DASHBOARD, load_dashboard_metrics

dm = load_dashboard_metrics()


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{route=~"/v1/.*"}[$__rate_interval])))',
         {"a_seconds"}),
        ("sum(rate(x_sum[5m])) / sum(rate(x_count[5m]))", {"x"}),
        ('sum by (route, status) (rate(req_total{status=~"5.."}[1m]))', {"req_total"}),
        ("sum(rate(a_total[5m] offset 1h)) / on(job) group_left(version) b_info", {"a_total", "b_info"}),
        ("max(up) by (instance) > bool 1e3", {"up"}),
        ('count_values("le", c_gauge) or vector(0)', {"c_gauge"}),
        ('{__name__="named_bucket", job="x"}', {"named"}),
        ("sum(a)by(le) and without_b unless on_c", {"a", "without_b", "on_c"}),
        ("increase(h_bucket[$__range]) * ${factor} + [[legacy]]", {"h"}),
        ("clamp_min(sum(rate(t_total[2m:30s])), 1e-9)", {"t_total"}),
    ],
)
def test_metric_names_in_expr(expr: str, expected: set[str]) -> None:
    assert dm.metric_names_in_expr(expr) == expected


def test_metric_names_in_dashboard_walks_rows_and_nested_panels(tmp_path: Path) -> None:
    dashboard = {
        "templating": {"list": [{"name": "DS_PROMETHEUS", "query": "prometheus"}]},
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "rate(a_total[5m])"}, {"expr": "b_gauge"}]},
            {"type": "row", "collapsed": True, "panels": [
                {"type": "heatmap", "targets": [{"expr": "sum by (le) (increase(c_seconds_bucket[1h]))"}]},
            ]},
            {"type": "text", "options": {"content": "not_a_metric"}},
        ],
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dashboard))
    assert dm.metric_names_in_dashboard(path) == {"a_total", "b_gauge", "c_seconds"}


EXPOSITION = """\
# HELP req_total Requests.
# TYPE req_total counter
req_total{route="/a",status="200"} 3.0
req_created{route="/a",status="200"} 1.7e9
# HELP lat_seconds Latency.
# TYPE lat_seconds histogram
lat_seconds_bucket{le="0.5"} 1.0
lat_seconds_bucket{le="+Inf"} 2.0
lat_seconds_sum 1.2
lat_seconds_count 2.0
# HELP declared_only_seconds Labelled histogram with no observation yet.
# TYPE declared_only_seconds histogram
# TYPE jobs counter
# TYPE depth gauge
depth{state="waiting"} 0.0
untyped_series 1
"""


def test_missing_from_exposition() -> None:
    names = {"req_total", "lat_seconds", "declared_only_seconds", "jobs_total", "depth", "untyped_series",
             "absent_total", "lat"}
    assert dm.missing_from_exposition(names, EXPOSITION) == {"absent_total", "lat"}


def test_histogram_present_through_its_series_only() -> None:
    text = 'h_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
    assert dm.missing_from_exposition({"h"}, text) == set()
    assert dm.missing_from_exposition({"h_total"}, text) == {"h_total"}


def test_dashboard_covers_the_issue_panels() -> None:
    names = dm.metric_names_in_dashboard(DASHBOARD)
    required = {
        "ldserve_http_requests_total",  # request rate and errors
        "ldserve_request_duration_seconds", "ldserve_queue_wait_seconds", "ldserve_inference_duration_seconds",
        "ldserve_queue_depth", "ldserve_batch_size", "ldserve_kept_fraction", "ldserve_uncond_stop_scale",
        "ldserve_ideal_speedup", "ldserve_gpu_memory_used_bytes",
    }
    assert required <= names, required - names
    text = DASHBOARD.read_text()
    for quantile in ("0.5", "0.95", "0.99"):
        for metric in ("request_duration_seconds", "queue_wait_seconds", "inference_duration_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate(ldserve_{metric}_bucket" in text


def test_dashboard_binds_to_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {"${DS_PROMETHEUS}"}
