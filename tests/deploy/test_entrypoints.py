"""Every `ldserve <subcommand>` / `python -m <module> <subcommand>` that a Dockerfile, the compose
file or a Kubernetes manifest runs is a real entrypoint of the package.

The invocations are read from the files themselves: Dockerfile ENTRYPOINT/CMD/HEALTHCHECK, compose
entrypoint/command/healthcheck (combined with the ENTRYPOINT of the Dockerfile the service builds),
rendered manifests' command/args/exec probes/preStop (combined with the ENTRYPOINT of the image's
Dockerfile, found through the compose service that builds that image name).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    DOCKERFILES,
    K8S,
    REPO,
    dockerfile_entrypoint,
    dockerfile_healthcheck,
    dockerfile_instructions,
    rendered_objects,
    require_module,
    run,
    shell_words,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUBCOMMANDS = frozenset({"serve", "api", "worker"})  # the service's CLI contract


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["scripts"]


def _cli_module() -> str:
    return _scripts()["ldserve"].split(":")[0]


def _invocations(argv: list[str], where: str) -> list[tuple[str, str, str]]:
    """(where, program, subcommand) for each ldserve / python -m call in argv."""
    found = []
    words = shell_words(argv)
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if Path(word).name == "ldserve":
            found.append((where, "ldserve", nxt))
        elif Path(word).name.startswith("python") and nxt == "-m" and i + 2 < len(words):
            module = words[i + 2]
            sub = words[i + 3] if i + 3 < len(words) else ""
            found.append((where, f"python -m {module}", sub))
    return found


def _compose() -> dict[str, Any]:
    yaml = require_module("yaml")
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _image_dockerfiles() -> dict[str, Path]:
    """Image repository name (e.g. `ldserve`) -> Dockerfile, from the compose services that build it."""
    images: dict[str, Path] = {}
    for service in _compose()["services"].values():
        if "build" in service and "image" in service:
            build = service["build"]
            dockerfile = REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            images[service["image"].split(":")[0]] = dockerfile
    return images


def _as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else shlex.split(value)


def _all_invocations() -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for dockerfile in DOCKERFILES:
        entrypoint, cmd = dockerfile_entrypoint(dockerfile)
        found += _invocations(entrypoint + cmd, f"{dockerfile.name} ENTRYPOINT+CMD")
        health = dockerfile_healthcheck(dockerfile)
        if health:
            found += _invocations(health[1], f"{dockerfile.name} HEALTHCHECK")
    images = _image_dockerfiles()
    for name, service in _compose()["services"].items():
        image_entrypoint, image_cmd = ([], [])
        if "build" in service:
            image_entrypoint, image_cmd = dockerfile_entrypoint(images[service["image"].split(":")[0]])
        entrypoint = _as_argv(service.get("entrypoint")) or image_entrypoint
        command = _as_argv(service.get("command")) or image_cmd
        found += _invocations(entrypoint + command, f"compose {name}")
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list):
            found += _invocations(test[1:], f"compose {name} healthcheck")
    for overlay in ("base", "overlays/cpu", "overlays/gpu"):
        for obj in rendered_objects(K8S / overlay):
            pod = obj.get("spec", {}).get("template", {}).get("spec")
            if not pod:
                continue
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                where = f"k8s {overlay} {obj['metadata']['name']}/{container['name']}"
                repo_name = container["image"].split(":")[0].split("/")[-1]
                image_entrypoint, image_cmd = ([], [])
                if repo_name in images:
                    image_entrypoint, image_cmd = dockerfile_entrypoint(images[repo_name])
                argv = (container.get("command") or image_entrypoint) + (container.get("args") or image_cmd)
                found += _invocations(argv, where)
                for key in ("livenessProbe", "readinessProbe", "startupProbe"):
                    found += _invocations(container.get(key, {}).get("exec", {}).get("command", []), where)
                pre_stop = container.get("lifecycle", {}).get("preStop", {})
                found += _invocations(pre_stop.get("exec", {}).get("command", []), where)
    return found


@pytest.fixture(scope="module")
def invocations() -> list[tuple[str, str, str]]:
    return _all_invocations()


def test_ldserve_script_is_declared() -> None:
    scripts = _scripts()
    assert scripts.get("ldserve") == "service.cli:main"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(pattern.rstrip("*") == "service" for pattern in include), include


def test_every_invocation_is_a_known_subcommand(invocations: list[tuple[str, str, str]]) -> None:
    assert invocations, "no ldserve invocation found in Dockerfiles, compose or manifests"
    cli_module = _cli_module()
    bad = [inv for inv in invocations if inv[2] not in SUBCOMMANDS]
    assert not bad, f"unknown subcommands (allowed {sorted(SUBCOMMANDS)}): {bad}"
    modules = {prog for _, prog, _ in invocations if prog.startswith("python -m ")}
    assert modules <= {f"python -m {cli_module}"}, f"python -m must run the ldserve script's module: {modules}"


def test_serve_api_and_worker_all_have_an_entrypoint(invocations: list[tuple[str, str, str]]) -> None:
    assert {sub for _, _, sub in invocations} == SUBCOMMANDS


def test_files_the_images_run_are_in_the_repo() -> None:
    """Helper executables named by health checks (COPY targets) exist as files in the build context."""
    for dockerfile in DOCKERFILES:
        copies = {}
        for instr, rest in dockerfile_instructions(dockerfile):
            if instr == "COPY" and "--from" not in rest:
                src, dest = rest.split()[-2:]
                copies[Path(dest).name] = src
        health = dockerfile_healthcheck(dockerfile)
        assert health, f"{dockerfile.name} has no HEALTHCHECK"
        program = Path(health[1][0]).name
        assert program in copies, f"{dockerfile.name}: HEALTHCHECK runs {program}, which no COPY installs"
        assert (REPO / copies[program]).is_file()


def test_cli_accepts_each_subcommand(invocations: list[tuple[str, str, str]]) -> None:
    """Once the service package is in the tree, `python -m service.cli <sub> --help` must succeed."""
    cli_module = _cli_module()
    cli_path = REPO / Path(*cli_module.split(".")).with_suffix(".py")
    if not cli_path.is_file():
        pytest.skip(f"{cli_path.relative_to(REPO)} is not in this tree yet (service package not merged)")
    for sub in sorted({sub for _, _, sub in invocations}):
        proc = run([sys.executable, "-m", cli_module, sub, "--help"], timeout=300)
        assert proc.returncode == 0, f"`python -m {cli_module} {sub} --help` failed:\n{proc.stderr[-2000:]}"
