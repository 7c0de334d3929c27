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
    return dockerfile_stages(path)[-1]


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Each build stage's (INSTRUCTION, arguments), FROM first; global ARGs before the first FROM dropped."""
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
    return stages[1:] or stages


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


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV of the final stage (``ENV A=1 B=2`` and legacy ``ENV A 1``), the base every container gets."""
    env: dict[str, str] = {}
    for instr, rest in dockerfile_instructions(path):
        if instr != "ENV":
            continue
        words = shlex.split(rest)
        if words and "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


# --- docker-compose ------------------------------------------------------------------------------

def compose_config(*extra: str) -> dict[str, Any]:
    """`docker-compose [extra] config`, parsed: services with every value interpolated."""
    import os

    yaml = require_module("yaml")
    compose = require_executable("docker-compose")
    # Interpolate the file's own defaults, not whatever the CI shell exports.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDSERVE_", "COMPOSE_", "GRAFANA_"))}
    proc = run([compose, "-f", str(COMPOSE_FILE), *extra, "config"], env=env)
    assert proc.returncode == 0, f"docker-compose {' '.join(extra)} config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def compose_ldserve_services(config: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """The services of ``profile`` that run the ldserve image (compose v1 prints every profile's)."""
    return {
        name: service
        for name, service in config["services"].items()
        if str(service.get("image", "")).split(":")[0] == "ldserve" and profile in service.get("profiles", [profile])
    }


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment as the container sees it: the image's ENV, then the service's."""
    env = dockerfile_env(REPO / service.get("build", {}).get("dockerfile", "docker/Dockerfile"))
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    env.update({k: "" if v is None else str(v) for k, v in raw.items()})
    return env


# --- Kubernetes ----------------------------------------------------------------------------------

def k8s_container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What a container's environment holds, as the kubelet builds it: the image's ENV, then each
    envFrom source in order (ConfigMaps and Secrets of the same rendering; a Secret created out of
    band adds nothing here), then ``env`` (which wins over envFrom). ``valueFrom`` entries are left out."""
    import base64

    def find(kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)

    env = dockerfile_env(DOCKERFILES[0])
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            cm = find("ConfigMap", source["configMapRef"]["name"])
            assert cm is not None or source["configMapRef"].get("optional"), f"no ConfigMap {source}"
            env.update({prefix + k: v for k, v in (cm or {}).get("data", {}).items()})
        elif "secretRef" in source:
            secret = find("Secret", source["secretRef"]["name"]) or {}
            env.update({prefix + k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
            env.update({prefix + k: v for k, v in secret.get("stringData", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def service_settings(env: dict[str, str]) -> Any:
    """``service.settings.ServiceSettings`` built from exactly ``env`` (the LDSERVE_* variables of
    this process are hidden), as the container's ``ldserve`` would build it; raises its ValidationError."""
    import os
    from unittest import mock

    from service.settings import ServiceSettings

    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("LDSERVE_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return ServiceSettings()


def api_drain_timeout_s(settings: Any) -> float:
    """The API's time after SIGTERM as service/cli.py computes it: the drain delay (still serving,
    readiness 503), then the drain (unset: sync timeout + 5)."""
    import math

    return settings.drain_delay_s + float(math.ceil(settings.drain_timeout_s or settings.sync_timeout_s + 5))


# --- .dockerignore -------------------------------------------------------------------------------

def read_dockerignore(path: Path) -> list[str]:
    """Patterns of a .dockerignore as Docker reads them (moby/patternmatcher ignorefile.ReadAll):
    comments and blank lines dropped, each pattern cleaned, a leading "/" removed, "!" kept."""
    import posixpath

    patterns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = posixpath.normpath(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append(("!" if invert else "") + pattern)
    return patterns


class DockerignoreMatcher:
    """moby/patternmatcher's PatternMatcher.MatchesOrParentMatches, ported: a path is excluded when
    the last pattern that matches it or one of its parent directories is not a "!" pattern.
    ``*`` and ``?`` stop at "/", ``**`` crosses directories, patterns are anchored at the root."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = []
        for raw in patterns:
            exclusion = raw.startswith("!")
            text = raw[1:] if exclusion else raw
            self.patterns.append((exclusion, text, self._compile(text)))

    @staticmethod
    def _compile(pattern: str) -> Any:
        """(kind, arg): ("exact", s) | ("prefix", s) | ("suffix", s) | ("regexp", compiled), as Pattern.compile."""
        regex, kind, pos, step = "^", "exact", 0, 0
        while pos < len(pattern):
            ch = pattern[pos]
            pos += 1
            if ch == "*":
                if pos < len(pattern) and pattern[pos] == "*":
                    pos += 1
                    if pos < len(pattern) and pattern[pos] == "/":  # "**/" is "**"
                        pos += 1
                    if pos >= len(pattern):  # trailing "**": everything below
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            regex += ".*"
                            kind = "regexp"
                    else:
                        regex += "(.*/)?"
                        kind = "regexp"
                    if step == 0:
                        kind = "suffix"
                else:
                    regex += "[^/]*"
                    kind = "regexp"
            elif ch == "?":
                regex += "[^/]"
                kind = "regexp"
            elif ch in ".+()|{}$":
                regex += "\\" + ch
            elif ch == "\\":
                if pos < len(pattern):
                    regex += "\\" + pattern[pos]
                    pos += 1
                    kind = "regexp"
                else:
                    regex += "\\\\"
            elif ch in "[]":
                regex += ch
                kind = "regexp"
            else:
                regex += ch
            step += 1
        if kind == "regexp":
            return kind, re.compile(regex + "$")
        return kind, pattern

    @staticmethod
    def _match(compiled: Any, path: str) -> bool:
        kind, arg = compiled
        if kind == "exact":
            return path == arg
        if kind == "prefix":
            return path.startswith(arg[:-2])
        if kind == "suffix":
            suffix = arg[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return arg.match(path) is not None

    def excluded(self, path: str) -> bool:
        parents = path.split("/")[:-1]
        matched = False
        for exclusion, _, compiled in self.patterns:
            if exclusion != matched:
                continue
            match = self._match(compiled, path)
            if not match:
                match = any(self._match(compiled, "/".join(parents[: i + 1])) for i in range(len(parents)))
            if match:
                matched = not exclusion
        return matched

    def may_reinclude_under(self, directory: str) -> bool:
        """Whether a "!" pattern could bring back something under an excluded directory."""
        return any(exclusion and (text.startswith(directory + "/") or "**" in text)
                   for exclusion, text, _ in self.patterns)


def build_context_files(root: Path, dockerignore: Path) -> set[str]:
    """Files (slash paths from ``root``) that Docker sends as the build context under ``dockerignore``."""
    import os

    matcher = DockerignoreMatcher(read_dockerignore(dockerignore))
    kept: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames
                       if not (matcher.excluded(prefix + d) and not matcher.may_reinclude_under(prefix + d))]
        kept.update(prefix + f for f in filenames if not matcher.excluded(prefix + f))
    return kept
