"""Kustomize base and overlays render, validate against a pinned Kubernetes schema, and carry the
probes, drain budget, GPU limits, PDBs, KEDA scaler and scrape annotations issue 5 asks for.

kubernetes-validate has no schema for KEDA's ScaledObject (a CRD), so that kind alone is not
schema-validated: it is asserted present and its fields are checked by hand below.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    K8S,
    api_drain_timeout_s,
    k8s_container_env,
    rendered_objects,
    require_module,
    service_settings,
)

KUBERNETES_VERSION = "1.32.0"
SKIPPED_KINDS = frozenset({"ScaledObject"})  # KEDA CRD: no schema in kubernetes-validate
TARGETS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
# The KEDA trigger must name the stream and consumer group the service really uses
from service.keys import Keys  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

_KEYS = Keys(ServiceSettings.model_fields["key_prefix"].default)
STREAM_KEY = _KEYS.stream
# Shutdown after the drain (closing connections, lifespan, Redis): grace >= preStop + drain + this.
DRAIN_MARGIN_S = 10


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, rendered_objects(TARGETS[request.param])


@pytest.fixture(scope="module")
def gpu() -> list[dict[str, Any]]:
    return rendered_objects(TARGETS["gpu"])


@pytest.fixture(scope="module")
def cpu() -> list[dict[str, Any]]:
    return rendered_objects(TARGETS["cpu"])


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in _of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    assert pre_stop, f"container {container['name']} has no preStop hook"
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep"), command
    return float(command[1])


def test_every_object_validates_against_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    kv = require_module("kubernetes_validate")
    name, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert SKIPPED_KINDS <= kinds, f"{name}: KEDA ScaledObject missing"
    errors = []
    for obj in objects:
        if obj["kind"] in SKIPPED_KINDS:
            continue
        try:
            kv.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kv.ValidationError, kv.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    assert not errors, f"{name}:\n" + "\n".join(errors)


def test_validator_rejects_a_broken_deployment(gpu: list[dict[str, Any]]) -> None:
    """Guard against a validator that accepts anything (strict mode must see unknown fields)."""
    kv = require_module("kubernetes_validate")
    broken = copy.deepcopy(_named(gpu, "Deployment", "ldserve-worker"))
    _containers(broken)[0]["livenessProbes"] = _containers(broken)[0].pop("livenessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_deployments_have_probes_and_drain_budget(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    deployments = {d["metadata"]["name"]: d for d in _of_kind(objects, "Deployment")}
    assert set(deployments) == {"ldserve-api", "ldserve-worker"}, name
    for dep_name, dep in deployments.items():
        pod = dep["spec"]["template"]
        drain = float(pod["metadata"]["annotations"]["ldserve.dev/drain-timeout-seconds"])
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        for container in _containers(dep):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in container, f"{name}: {dep_name}/{container['name']} lacks {probe}"
            pre_stop = _prestop_seconds(container)
            if dep_name == "ldserve-api":
                # The drain the API really runs: LDSERVE_DRAIN_TIMEOUT_S as rendered into its
                # environment (unset: SYNC_TIMEOUT_S + 5), not only what the annotation claims.
                settings_drain = api_drain_timeout_s(service_settings(k8s_container_env(objects, container)))
                assert settings_drain == drain, (
                    f"{name}: {dep_name} drains {settings_drain} s (LDSERVE_DRAIN_TIMEOUT_S), annotation says {drain}")
                drain = settings_drain
            assert grace >= pre_stop + drain + DRAIN_MARGIN_S, (
                f"{name}: {dep_name} grace {grace} < preStop {pre_stop} + drain {drain} + margin {DRAIN_MARGIN_S}")
    api = _containers(deployments["ldserve-api"])[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"


def test_worker_probes_use_its_health_routes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """/metrics answers as soon as the port opens, long before the model is loaded: startup and
    readiness wait for /health/ready (loaded, warm, not draining), liveness is /health/live."""
    name, objects = rendered
    worker = _containers(_named(objects, "Deployment", "ldserve-worker"))[0]
    port_names = {p.get("name"): p["containerPort"] for p in worker["ports"]}
    env = k8s_container_env(objects, worker)
    metrics_port = int(env.get("LDSERVE_WORKER_METRICS_PORT", "9101"))
    expected = {"startupProbe": "/health/ready", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    for probe, path in expected.items():
        get = worker[probe].get("httpGet")
        assert get, f"{name}: worker {probe} is not an HTTP check: {worker[probe]}"
        assert get["path"] == path, f"{name}: worker {probe} probes {get['path']}, want {path}"
        assert port_names.get(get["port"], get["port"]) == metrics_port, f"{name}: worker {probe} port {get['port']}"


def _startup_budget_s(workload: dict[str, Any]) -> float:
    probe = _containers(workload)[0]["startupProbe"]
    return probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)


def test_startup_probe_is_sized_to_model_load(gpu: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> None:
    # Infinity-8B + flan-t5-xl + VAE from a volume, plus warm-up: allow at least 10 minutes (15 set).
    assert _startup_budget_s(_named(gpu, "Deployment", "ldserve-worker")) >= 600
    assert _startup_budget_s(_named(cpu, "Deployment", "ldserve-worker")) >= 120


def _gpu_requests(obj: Any) -> list[Any]:
    """Every value under an `nvidia.com/gpu` key anywhere in the object."""
    found: list[Any] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "nvidia.com/gpu":
                found.append(value)
            else:
                found.extend(_gpu_requests(value))
    elif isinstance(obj, list):
        for item in obj:
            found.extend(_gpu_requests(item))
    return found


def test_gpu_overlay_limits_gpus_on_the_worker_only(gpu: list[dict[str, Any]]) -> None:
    worker = _containers(_named(gpu, "Deployment", "ldserve-worker"))[0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    api = _named(gpu, "Deployment", "ldserve-api")
    assert not _gpu_requests(api)
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    settings = _of_kind(gpu, "ConfigMap")[0]["data"]
    assert settings["LDSERVE_DEVICE"] == "cuda"
    for key in ("LDSERVE_TRANSFORMER_PATH", "LDSERVE_VAE_PATH", "LDSERVE_TEXT_ENCODER_PATH"):
        assert settings[key].startswith("/models/"), key


@pytest.mark.parametrize("target", ["base", "cpu"])
def test_no_gpu_outside_the_gpu_overlay(target: str) -> None:
    objects = rendered_objects(TARGETS[target])
    assert not _gpu_requests(objects), f"{target} asks for nvidia.com/gpu"
    settings = _of_kind(objects, "ConfigMap")[0]["data"]
    assert settings["LDSERVE_DEVICE"] == "cpu"


def test_pdbs_cover_api_and_worker(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    pdbs = _of_kind(objects, "PodDisruptionBudget")
    # API readiness needs a warm worker: unready pods must stay evictable or node drains stall.
    for pdb in pdbs:
        assert pdb["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", pdb["metadata"]["name"]
    for dep in _of_kind(objects, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(
            all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()) for pdb in pdbs
        ), f"{name}: no PodDisruptionBudget selects {dep['metadata']['name']}"


def test_keda_scales_the_worker_on_the_job_stream(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    (scaled,) = _of_kind(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "ldserve-worker"
    _named(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    # The API is not ready without a warm worker, so scaling to zero would deadlock.
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == STREAM_KEY
    # XLEN (waiting + in progress): the group's lag reads NULL after the API XDELs a canceled or
    # expired queued entry. KEDA uses streamLength only without consumerGroup (with one it falls
    # back to the pending count, which does not see the backlog).
    assert "streamLength" in meta and "consumerGroup" not in meta and "lagCount" not in meta, meta
    # Per-replica target >= one worker batch, else a worker's own running batch scales it up.
    worker = _containers(_named(objects, "Deployment", "ldserve-worker"))[0]
    batch = service_settings(k8s_container_env(objects, worker)).max_batch_size
    assert batch <= int(meta["streamLength"]) <= 4 * batch, (meta["streamLength"], batch)
    # KEDA owns the replica count: a `replicas` in the Deployment would reset it on every apply.
    assert "replicas" not in _named(objects, "Deployment", "ldserve-worker")["spec"], name
    namespace = scaled["metadata"]["namespace"]
    redis_service = _named(objects, "Service", "ldserve-redis")
    assert meta["address"] == f"ldserve-redis.{namespace}.svc.cluster.local:{redis_service['spec']['ports'][0]['port']}"


def test_settings_and_secret_wiring(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    config_maps = {c["metadata"]["name"] for c in _of_kind(objects, "ConfigMap")}
    secrets = {s["metadata"]["name"] for s in _of_kind(objects, "Secret")}
    api = _containers(_named(objects, "Deployment", "ldserve-api"))[0]
    refs = api["envFrom"]
    assert any(r.get("configMapRef", {}).get("name") in config_maps for r in refs)
    secret_refs = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
    assert secret_refs == {"ldserve-secrets"}, name
    # Workers get the Secret too (LDSERVE_REDIS_URL with credentials); optional, like a missing
    # key, so a worker without it still starts.
    worker = _containers(_named(objects, "Deployment", "ldserve-worker"))[0]
    worker_refs = worker["envFrom"]
    assert any(r.get("configMapRef", {}).get("name") in config_maps for r in worker_refs)
    assert [r["secretRef"] for r in worker_refs if "secretRef" in r] == [{"name": "ldserve-secrets", "optional": True}]
    if name == "cpu":
        assert secret_refs <= secrets, "the cpu overlay generates its dev Secret"
    else:
        assert not secrets, f"{name}: production API keys must not be committed (create the Secret out of band)"
    settings = next(c for c in _of_kind(objects, "ConfigMap"))["data"]
    assert "LDSERVE_API_KEYS" not in settings
    assert settings["LDSERVE_REDIS_URL"].startswith("redis://ldserve-redis:")


def test_pods_run_as_non_root_and_are_scraped(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    for dep in _of_kind(objects, "Deployment"):
        pod = dep["spec"]["template"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, f"{name}: scrape port not exposed"
        assert annotations["prometheus.io/path"] == "/metrics"
    worker = _named(objects, "Deployment", "ldserve-worker")
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9101"


def test_redis_keeps_an_append_only_file(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    redis = _named(objects, "StatefulSet", "ldserve-redis")
    args = _containers(redis)[0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    # capped well under the container's limit, refusing writes (503s) rather than evicting jobs
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    cap_gb = float(args[args.index("--maxmemory") + 1].removesuffix("gb"))
    limit_gi = float(_containers(redis)[0]["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert cap_gb * 1e9 <= 0.6 * limit_gi * 2**30
    assert redis["spec"]["volumeClaimTemplates"], "AOF needs a persistent volume"


def test_gpu_models_volume_is_shared_and_mounted_read_only(gpu: list[dict[str, Any]]) -> None:
    """ReadWriteMany (a copy job can fill it; an RWX class or a bound PV is documented), read-only in workers."""
    pvc = _named(gpu, "PersistentVolumeClaim", "ldserve-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    worker = _named(gpu, "Deployment", "ldserve-worker")
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    claim = next(v for v in volumes.values() if v.get("persistentVolumeClaim", {}).get("claimName") == "ldserve-models")
    assert claim["persistentVolumeClaim"].get("readOnly") is True
    mount = next(m for m in _containers(worker)[0]["volumeMounts"] if m["name"] == claim["name"])
    assert mount.get("readOnly") is True


COMPONENT = K8S / "components" / "redis-networkpolicy"


def test_redis_network_policy_component(tmp_path: Path) -> None:
    """The opt-in component renders with an overlay, validates, selects the Redis pods and lets in
    exactly the api and worker pods (plus the KEDA namespace) on the Redis port."""
    kv = require_module("kubernetes_validate")
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'cpu', tmp_path)}\n"
        f"components:\n  - {os.path.relpath(COMPONENT, tmp_path)}\n")  # kustomize refuses absolute paths
    objects = rendered_objects(tmp_path)
    (policy,) = _of_kind(objects, "NetworkPolicy")
    kv.validate(policy, KUBERNETES_VERSION, strict=True)
    redis = _named(objects, "StatefulSet", "ldserve-redis")
    assert policy["metadata"]["namespace"] == redis["metadata"]["namespace"]

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
                   if e["operator"] == "In")

    assert selects(policy["spec"]["podSelector"], redis["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    port = _containers(redis)[0]["ports"][0]["containerPort"]
    assert [p["port"] for p in rule["ports"]] == [port]
    pod_selectors = [f["podSelector"] for f in rule["from"] if "podSelector" in f and "namespaceSelector" not in f]
    allowed = {d["metadata"]["name"] for d in _of_kind(objects, "Deployment") + _of_kind(objects, "StatefulSet")
               if any(selects(s, d["spec"]["template"]["metadata"]["labels"]) for s in pod_selectors)}
    assert allowed == {"ldserve-api", "ldserve-worker"}, allowed
