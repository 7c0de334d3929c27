"""Kustomize base and overlays render, validate against a pinned Kubernetes schema, and carry the
probes, drain budget, GPU limits, PDBs, KEDA scaler and scrape annotations issue 5 asks for.

kubernetes-validate has no schema for KEDA's ScaledObject (a CRD), so that kind alone is not
schema-validated: it is asserted present and its fields are checked by hand below.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from deploy_helpers import K8S, rendered_objects, require_module

KUBERNETES_VERSION = "1.32.0"
SKIPPED_KINDS = frozenset({"ScaledObject"})  # KEDA CRD: no schema in kubernetes-validate
TARGETS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
# The KEDA trigger must name the stream and consumer group the service really uses
from service.keys import Keys  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

_KEYS = Keys(ServiceSettings.model_fields["key_prefix"].default)
STREAM_KEY = _KEYS.stream
CONSUMER_GROUP = _KEYS.group


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
            assert grace >= pre_stop + drain, f"{name}: {dep_name} grace {grace} < preStop {pre_stop} + drain {drain}"
    api = _containers(deployments["ldserve-api"])[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"


def _startup_budget_s(workload: dict[str, Any]) -> float:
    probe = _containers(workload)[0]["startupProbe"]
    return probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)


def test_startup_probe_is_sized_to_model_load(gpu: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> None:
    # Infinity-8B + flan-t5-xl + VAE from a volume, plus warm-up: allow at least 10 minutes.
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
    assert meta["stream"] == STREAM_KEY and meta["consumerGroup"] == CONSUMER_GROUP
    assert {"lagCount", "pendingEntriesCount"} & set(meta), meta
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
