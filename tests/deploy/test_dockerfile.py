"""docker/Dockerfile: CUDA and CPU torch builds, dependency layer before the source, non-root, no
weights but the shipped demo model, readiness HEALTHCHECK."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from deploy_helpers import (
    DOCKERFILES,
    REPO,
    DockerignoreMatcher,
    build_context_files,
    dockerfile_entrypoint,
    dockerfile_healthcheck,
    dockerfile_instructions,
    dockerfile_stages,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest):
    return request.param


def test_there_is_a_dockerfile() -> None:
    assert DOCKERFILES, "docker/Dockerfile missing"


def test_torch_build_is_chosen_by_build_argument(dockerfile) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cu\d+", text, re.M), "GPU (CUDA) build must be the default"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    # torch is installed before anything else, so no dependency pulls its own torch build.
    assert text.index('pip install "torch==') < text.index("pip install -r") < text.index("pip install --no-deps")


def test_dependencies_have_their_own_layer_before_the_source(dockerfile) -> None:
    """A source change must not reinstall the dependencies: they are installed from pyproject.toml
    alone, before `COPY . /src`, and the package itself with --no-deps after it."""
    (builder,) = [s for s in dockerfile_stages(dockerfile) if any(i == "COPY" and "--from" not in r for i, r in s)
                  and any(i == "RUN" and "pip install" in r for i, r in s)]
    steps = [f"{instr} {rest}" for instr, rest in builder]
    copy_all = next((i for i, s in enumerate(steps) if re.fullmatch(r"COPY \. /src/?", s)), None)
    deps = next((i for i, s in enumerate(steps) if s.startswith("RUN") and "pip install -r" in s), None)
    package = next((i for i, s in enumerate(steps) if s.startswith("RUN") and "pip install --no-deps" in s), None)
    assert None not in (copy_all, deps, package), (
        f"want RUN pip install -r, COPY . /src, RUN pip install --no-deps: {steps}")
    assert deps < copy_all < package, steps
    before = [s for s in steps[:deps] if s.startswith(("COPY", "ADD"))]
    allowed = {"pyproject.toml", "docker/pyproject_requirements.py"}
    assert before and all(s.split()[1:-1] and set(s.split()[1:-1]) <= allowed for s in before), before
    # What that layer installs is exactly the project's (and its build backend's) requirements.
    out = subprocess.run([sys.executable, str(REPO / "docker" / "pyproject_requirements.py"),
                          str(REPO / "pyproject.toml")], capture_output=True, text=True, check=True).stdout
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert out.split("\n")[:-1] == pyproject["build-system"]["requires"] + pyproject["project"]["dependencies"]


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


@pytest.fixture(scope="module")
def context_files() -> set[str]:
    return build_context_files(REPO, REPO / ".dockerignore")


def test_build_context_keeps_the_demo_model_and_no_other_weights(context_files: set[str]) -> None:
    """The .dockerignore rules applied to this tree (Docker's matching: patterns anchored at the root,
    `*` within a directory, `**` across, last match wins): every demo weight file that pyproject.toml
    ships as package data is sent, no other checkpoint, cache or local weights folder is."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = {p.relative_to(REPO).as_posix()
               for pattern in pyproject["tool"]["setuptools"]["package-data"]["demo"]
               for p in (REPO / "demo").glob(pattern) if p.is_file()}
    assert {"demo/weights/transformer.safetensors", "demo/weights/vae.safetensors",
            "demo/weights/text_encoder/model.safetensors"} <= shipped, "the demo model is not in this tree"
    assert shipped <= context_files, sorted(shipped - context_files)
    weights = {f for f in context_files if re.search(r"\.(safetensors|pth|ckpt)$", f)}
    assert weights <= shipped, sorted(weights - shipped)
    assert {"pyproject.toml", "README.md", "service/cli.py", "docker/healthcheck.py",
            "docker/pyproject_requirements.py"} <= context_files
    banned = re.compile(r"(^|/)(\.venv|\.git|__pycache__|\.hypothesis|\.pytest_cache|gpu_out|[^/]*\.egg-info)/"
                        r"|^(weights|models|\.gpu|\.ci|\.bench|tests|deploy|docs)/")
    assert not [f for f in context_files if banned.search(f)], sorted(f for f in context_files if banned.search(f))


def test_dockerignore_matcher_follows_docker() -> None:
    """Guard for the port of moby/patternmatcher used above (cases from Docker's documentation)."""
    m = DockerignoreMatcher(["*.md", "!README.md", "**/*.pyc", "temp?", "*/temp*", "weights", "!weights/keep"])
    assert m.excluded("CHANGES.md") and not m.excluded("docs/CHANGES.md") and not m.excluded("README.md")
    assert m.excluded("a.pyc") and m.excluded("a/b/c.pyc")
    assert m.excluded("tempa") and m.excluded("x/temporary") and not m.excluded("x/y/temporary")
    assert m.excluded("weights/a/b") and not m.excluded("weights/keep") and not m.excluded("demo/weights/x")


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
