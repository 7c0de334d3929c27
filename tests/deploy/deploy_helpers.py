"""Shared helpers for the deployment checks (compose, kustomize, Dockerfiles, dashboard).

Missing tools fail the tests with the command that installs them; nothing is skipped silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = REPO / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "ldserve-dashboard.json"
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))

INSTALL_HINTS = {
    "docker-compose": "apt-get update && apt-get install -y docker-compose",
    "kubectl": "install kubectl (https://kubernetes.io/docs/tasks/tools/), e.g. apt-get install -y kubectl "
               "from the Kubernetes apt repository",
    "kubernetes_validate": "pip install kubernetes-validate",
    "yaml": "pip install pyyaml",
}


def require_executable(name: str) -> str:
    """Path of ``name`` on PATH, or fail the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for this check and is not installed: {INSTALL_HINTS[name]}")
    return path


def require_module(name: str) -> ModuleType:
    """Import ``name``, or fail the test saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"Python module {name!r} is required for this check and is not installed: "
                    f"{INSTALL_HINTS[name]}")


def run(
    argv: list[str], *, cwd: Path = REPO, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env)


def load_dashboard_metrics() -> ModuleType:
    """deploy/dashboard_metrics.py, imported by path (deploy/ is not a Python package)."""
    spec = importlib.util.spec_from_file_location("dashboard_metrics", DEPLOY / "dashboard_metrics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_duration_s(value: str | int | float) -> float:
    """Compose durations ("10s", "1m30s", "10m") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparsable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfiles ---------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final build stage, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    if current:
        logical.append(current)
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), rest.strip()))
    return stages[-1]


def exec_form(arguments: str) -> list[str]:
    """A Dockerfile exec-form JSON array, or a shell-form string split the way sh would."""
    arguments = arguments.strip()
    if arguments.startswith("["):
        value = json.loads(arguments)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return ["/bin/sh", "-c", arguments]


def dockerfile_entrypoint(path: Path) -> tuple[list[str], list[str]]:
    """(ENTRYPOINT, CMD) of the final stage (the last of each wins, as in Docker)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for instr, rest in dockerfile_instructions(path):
        if instr == "ENTRYPOINT":
            entrypoint = exec_form(rest)
        elif instr == "CMD":
            cmd = exec_form(rest)
    return entrypoint, cmd


def dockerfile_healthcheck(path: Path) -> tuple[dict[str, str], list[str]] | None:
    """({option: value}, command) of the final stage's HEALTHCHECK, or None."""
    for instr, rest in dockerfile_instructions(path):
        if instr == "HEALTHCHECK":
            options = dict(re.findall(r"--([a-z-]+)=(\S+)", rest))
            _, _, command = rest.partition("CMD")
            return options, exec_form(command)
    return None


def shell_words(argv: list[str]) -> list[str]:
    """Flatten `sh -c "..."` style commands into words so nested invocations are seen too."""
    words: list[str] = []
    for i, word in enumerate(argv):
        words.append(word)
        if i > 0 and argv[i - 1] == "-c" and Path(argv[0]).name in {"sh", "bash", "/bin/sh", "/bin/bash"}:
            words.extend(shlex.split(word))
    return words


def rendered_objects(kustomization_dir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` parsed into objects."""
    yaml = require_module("yaml")
    kubectl = require_executable("kubectl")
    proc = run([kubectl, "kustomize", str(kustomization_dir)])
    assert proc.returncode == 0, f"kubectl kustomize {kustomization_dir} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
