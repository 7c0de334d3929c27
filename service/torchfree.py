"""Torch-free access to the engine's plain-data modules for the API process.

``pruning/__init__`` and ``model_loader/__init__`` import torch. Their config modules
(``pruning/config.py``, ``model_loader/configs.py``) do not, so the API loads those files
directly by path: one source of truth for presets and validation, no torch in the API.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load(relpath: str, name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def pruning_module() -> ModuleType:
    return _load("pruning/config.py", "ldserve_torchfree_pruning_config")


@lru_cache(maxsize=1)
def configs_module() -> ModuleType:
    return _load("model_loader/configs.py", "ldserve_torchfree_model_configs")


def pruning_presets() -> dict[str, Any]:
    return pruning_module().PRESETS


def model_presets() -> dict[str, Any]:
    return configs_module().PRESETS


def validate_pruning(preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The full PruningConfig as a dict (raises ValueError naming the field)."""
    return pruning_module().pruning_config(preset, **overrides).to_dict()
