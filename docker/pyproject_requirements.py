#!/usr/bin/env python3
"""Print the build backend's and the project's dependencies from pyproject.toml, one a line.

docker/Dockerfile installs these in a layer of their own (keyed on pyproject.toml alone), then the
package with ``--no-deps``, so a source change does not reinstall the dependencies.
Usage: ``python pyproject_requirements.py [pyproject.toml] > requirements.txt``.
"""

import sys

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib


def requirements(path: str) -> list[str]:
    with open(path, "rb") as f:
        meta = tomllib.load(f)
    return list(meta.get("build-system", {}).get("requires", [])) + list(meta["project"].get("dependencies", []))


if __name__ == "__main__":
    sys.stdout.write("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")) + "\n")
