"""Every metric the shipped Grafana dashboard queries exists on a live service's /metrics."""

from __future__ import annotations

import importlib.util

import httpx

from .conftest import AUTH, ROOT, Proc


def _dashboard_metrics():
    spec = importlib.util.spec_from_file_location("dashboard_metrics", ROOT / "deploy" / "dashboard_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_queries_only_exported_metrics(serve: Proc) -> None:
    dm = _dashboard_metrics()
    r = httpx.post(f"{serve.url}/generate", headers=AUTH, json={"prompt": "a red circle", "seed": 3,
                                                                 "pruning": "balanced"}, timeout=120)
    assert r.status_code == 200, r.text
    text = httpx.get(f"{serve.url}/metrics", headers=AUTH, timeout=10).text
    names = dm.metric_names_in_dashboard(ROOT / "deploy" / "grafana" / "ldserve-dashboard.json")
    assert len(names) >= 10
    assert dm.missing_from_exposition(names, text) == set()
    # and the check can fail: a name the service does not export is reported
    assert dm.missing_from_exposition(names | {"ldserve_not_a_metric_total"}, text) == {"ldserve_not_a_metric_total"}
