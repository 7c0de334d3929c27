"""docker/Dockerfile: CUDA and CPU torch builds, non-root, no weights, readiness HEALTHCHECK."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import DOCKERFILES, REPO, dockerfile_entrypoint, dockerfile_healthcheck, dockerfile_instructions


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest):
    return request.param


def test_there_is_a_dockerfile() -> None:
    assert DOCKERFILES, "docker/Dockerfile missing"


def test_torch_build_is_chosen_by_build_argument(dockerfile) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cu\d+", text, re.M), "GPU (CUDA) build must be the default"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    # torch is installed before the package, so `pip install .` never pulls its own torch build.
    assert text.index('pip install "torch==') < text.index("pip install /src")


def test_runs_as_non_root(dockerfile) -> None:
    users = [rest for instr, rest in dockerfile_instructions(dockerfile) if instr == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_no_weights_baked_in(dockerfile) -> None:
    final = dockerfile_instructions(dockerfile)
    assert ("VOLUME", '["/models"]') in final
    for instr, rest in final:
        if instr in {"COPY", "ADD"}:
            assert not re.search(r"\.(pth|safetensors|bin|ckpt)\b|/models", rest), rest
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"*.pth", "*.safetensors", "models"} <= set(ignored)


def test_healthcheck_probes_readiness(dockerfile) -> None:
    health = dockerfile_healthcheck(dockerfile)
    assert health is not None
    options, _ = health
    assert options == {"interval": "10s", "timeout": "3s", "retries": "3", "start-period": "600s"}
    script = (REPO / "docker" / "healthcheck.py").read_text()
    assert "/health/ready" in script


def test_entrypoint_is_the_ldserve_cli_under_an_init(dockerfile) -> None:
    entrypoint, cmd = dockerfile_entrypoint(dockerfile)
    assert entrypoint[-1] == "ldserve" and entrypoint[0] == "tini"
    assert cmd[0] == "serve"
