"""docker-compose.yml validates with Debian's docker-compose, and has the structure issue 5 asks for.

No Docker engine is needed: `docker-compose config` only parses, interpolates and validates.
Compose v1 (Debian's 1.29) prints every service whatever the profile; the cpu-profile run checks
that the file also validates when the profile is selected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    DASHBOARD,
    api_drain_timeout_s,
    compose_config,
    compose_environment,
    parse_duration_s,
    require_executable,
    require_module,
    service_settings,
)

GPU_SERVICES = ("api", "worker")
CPU_SERVICES = ("api-cpu", "worker-cpu")
# Shutdown after the API's drain (closing connections, lifespan, Redis) before Docker's SIGKILL.
DRAIN_MARGIN_S = 10


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def cpu_config() -> dict[str, Any]:
    return compose_config("--profile", "cpu")


def test_cpu_and_gpu_profiles_validate(cpu_config: dict[str, Any]) -> None:
    gpu = compose_config("--profile", "gpu")
    for name in CPU_SERVICES:
        assert cpu_config["services"][name]["profiles"] == ["cpu"]
    for name in GPU_SERVICES:
        assert gpu["services"][name]["profiles"] == ["gpu"]


def test_redis_persists_with_aof(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = redis["command"]
    words = command if isinstance(command, list) else command.split()
    assert "--appendonly" in words and words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--maxmemory-policy") + 1] == "noeviction" and words[words.index("--maxmemory") + 1]
    assert any(str(v).split(":")[1] == "/data" for v in redis.get("volumes", [])), "redis /data is not on a volume"
    assert "profiles" not in redis, "redis must run in every profile"


def test_worker_reserves_a_gpu(config: dict[str, Any]) -> None:
    devices = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and ("count" in d or "device_ids" in d)
        for d in devices
    ), devices


def test_cpu_profile_needs_no_gpu_and_uses_the_default_model(cpu_config: dict[str, Any]) -> None:
    for name in CPU_SERVICES:
        service = cpu_config["services"][name]
        assert "deploy" not in service or "reservations" not in service["deploy"].get("resources", {})
        env = service["environment"]
        assert env["LDSERVE_DEVICE"] == "cpu"
        assert env["LDSERVE_MODEL_PRESET"] == "demo"
        assert not any(str(v).endswith(":/models:ro") for v in service.get("volumes", []))
    # Same scrape targets as the gpu services: the cpu ones answer to the names `api` and `worker`.
    assert "api" in cpu_config["services"]["api-cpu"]["networks"]["default"]["aliases"]
    assert "worker" in cpu_config["services"]["worker-cpu"]["networks"]["default"]["aliases"]


def test_services_use_the_shared_redis(config: dict[str, Any]) -> None:
    for name in GPU_SERVICES + CPU_SERVICES:
        service = config["services"][name]
        assert service["environment"]["LDSERVE_REDIS_URL"].startswith("redis://redis:6379")
        assert "redis" in service["depends_on"]


def test_weights_are_mounted_read_only_not_built_in(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert any(str(v).endswith(":/models:ro") for v in worker["volumes"]), worker["volumes"]
    env = worker["environment"]
    for key in ("LDSERVE_TRANSFORMER_PATH", "LDSERVE_VAE_PATH", "LDSERVE_TEXT_ENCODER_PATH"):
        assert env[key].startswith("/models/"), (key, env[key])
    assert env["LDSERVE_DEVICE"] == "cuda"
    assert worker.get("ipc") == "host" or "shm_size" in worker


@pytest.mark.parametrize("name", ["redis", *GPU_SERVICES, *CPU_SERVICES, "prometheus", "grafana"])
def test_healthchecks(config: dict[str, Any], name: str) -> None:
    check = config["services"][name].get("healthcheck")
    assert check and check.get("test"), f"{name} has no healthcheck"
    assert parse_duration_s(check["interval"]) == 10
    assert parse_duration_s(check["timeout"]) == 3
    assert check["retries"] == 3
    test = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
    if name in ("api", "api-cpu"):
        assert "/health/ready" in test
    if name in ("worker", "worker-cpu"):
        # healthy = model loaded and warm (/metrics answers long before that)
        assert ":9101/health/ready" in test
    if name in GPU_SERVICES:
        assert parse_duration_s(check["start_period"]) >= 600, "real models need start_period 600s"


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_api_drain_fits_the_stop_grace_period(config: dict[str, Any], name: str) -> None:
    """Docker sends SIGKILL stop_grace_period after SIGTERM: the API's drain (LDSERVE_DRAIN_TIMEOUT_S
    as the container gets it; unset SYNC_TIMEOUT_S + 5 = 125 s) must end before that."""
    service = config["services"][name]
    drain = api_drain_timeout_s(service_settings(compose_environment(service)))
    grace = parse_duration_s(service.get("stop_grace_period", "10s"))
    assert grace >= drain + DRAIN_MARGIN_S, f"{name}: stop_grace_period {grace} < drain {drain} + {DRAIN_MARGIN_S}"


def test_prometheus_scrapes_api_and_worker(config: dict[str, Any]) -> None:
    yaml = require_module("yaml")
    mounts = config["services"]["prometheus"]["volumes"]
    source = next(str(v).split(":")[0] for v in mounts if ":/etc/prometheus/prometheus.yml" in str(v))
    prom = yaml.safe_load(Path(source).read_text())  # compose config prints absolute paths
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {"api:8000", "worker:9101"} <= targets
    paths = {job.get("metrics_path", "/metrics") for job in prom["scrape_configs"]}
    assert paths == {"/metrics"}


def test_grafana_provisions_datasource_and_dashboard(config: dict[str, Any]) -> None:
    yaml = require_module("yaml")
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in config["services"]["grafana"]["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    prov = Path(provisioning)
    datasources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    providers = yaml.safe_load((prov / "dashboards" / "ldserve.yml").read_text())["providers"]
    dashboard_target = next(t for t, s in mounts.items() if s.endswith("ldserve-dashboard.json"))
    assert Path(mounts[dashboard_target]).resolve() == DASHBOARD.resolve()
    assert any(dashboard_target.startswith(p["options"]["path"].rstrip("/") + "/") for p in providers)
    # The dashboard's datasource variable defaults to the provisioned datasource's uid.
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert variable["current"]["value"] in {d["uid"] for d in datasources}
    assert any(d["url"] == "http://prometheus:9090" for d in datasources)


def test_a_missing_tool_fails_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is skipped silently: without docker-compose the checks fail and say how to install it."""
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y docker-compose"):
        require_executable("docker-compose")
