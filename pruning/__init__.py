"""LD-Pruning engine: the batched, per-sample generation loop, policies and statistics.

Imports are lazy so that torch-free processes (the HTTP API) can use ``pruning.config``.
"""

from importlib import import_module

_EXPORTS = {
    "PRESETS": "config", "PruningConfig": "config", "get_pruning_preset": "config", "pruning_config": "config",
    "Engine": "engine", "ImageRequest": "engine", "ImageResult": "engine", "grids_for": "engine",
    "LoopOutput": "loop", "generate": "loop", "FastVARStyle": "policy", "LDPruning": "policy",
    "NoPruning": "policy", "PruningPolicy": "policy", "SkipVARStyle": "policy", "make_policy": "policy",
    "SampleStats": "stats", "ScaleStats": "stats",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
