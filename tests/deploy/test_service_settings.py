"""Every environment the deployment files give an ldserve container builds valid ServiceSettings.

`ldserve api` / `ldserve worker` validate their settings at start and exit on an error, so a
combination such as LDSERVE_MAX_BATCH_SIZE=2 with the default max_n of 4 crash-loops the pods. The
environments are taken from what the tools render: `docker-compose --profile P config` (each ldserve
service of each profile, on top of the image's ENV) and `kubectl kustomize` of the base and each
overlay (the api and worker containers: image ENV, envFrom ConfigMap/Secret, env).
"""

from __future__ import annotations

from typing import Any

import pytest
from deploy_helpers import (
    K8S,
    compose_config,
    compose_environment,
    compose_ldserve_services,
    k8s_container_env,
    rendered_objects,
    service_settings,
)
from pydantic import ValidationError

PROFILES = ("cpu", "gpu")
TARGETS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}


@pytest.fixture(scope="module", params=PROFILES)
def compose_profile(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, compose_config("--profile", request.param)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendering(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, rendered_objects(TARGETS[request.param])


def test_every_compose_service_environment_validates(compose_profile: tuple[str, dict[str, Any]]) -> None:
    profile, config = compose_profile
    services = compose_ldserve_services(config, profile)
    assert len(services) == 2, f"{profile}: expected an api and a worker service, found {sorted(services)}"
    errors = []
    for name, service in sorted(services.items()):
        try:
            service_settings(compose_environment(service))
        except ValidationError as exc:
            errors.append(f"compose --profile {profile} {name}: {exc}")
    assert not errors, "\n".join(errors)


def test_every_kubernetes_container_environment_validates(rendering: tuple[str, list[dict[str, Any]]]) -> None:
    target, objects = rendering
    checked, errors = [], []
    for dep in (o for o in objects if o["kind"] == "Deployment"):
        for container in dep["spec"]["template"]["spec"]["containers"]:
            where = f"kustomize {target} {dep['metadata']['name']}/{container['name']}"
            checked.append(where)
            try:
                service_settings(k8s_container_env(objects, container))
            except ValidationError as exc:
                errors.append(f"{where}: {exc}")
    assert len(checked) == 2, checked
    assert not errors, "\n".join(errors)


def test_the_check_catches_a_batch_smaller_than_max_n() -> None:
    """Guard: the helper really validates (the defect this file was written for)."""
    with pytest.raises(ValidationError, match="max_batch_size must be >= max_n"):
        service_settings({"LDSERVE_MAX_BATCH_SIZE": "2"})
    assert service_settings({"LDSERVE_MAX_BATCH_SIZE": "2", "LDSERVE_MAX_N": "2"}).max_n == 2
