"""LD-Pruning engine: the batched, per-sample generation loop, policies and statistics."""

from .config import PRESETS, PruningConfig, get_pruning_preset, pruning_config
from .engine import Engine, ImageRequest, ImageResult, grids_for
from .loop import LoopOutput, generate
from .policy import FastVARStyle, LDPruning, NoPruning, PruningPolicy, SkipVARStyle, make_policy
from .stats import SampleStats, ScaleStats

__all__ = [
    "PRESETS", "PruningConfig", "get_pruning_preset", "pruning_config", "Engine", "ImageRequest",
    "ImageResult", "grids_for", "LoopOutput", "generate", "FastVARStyle", "LDPruning", "NoPruning",
    "PruningPolicy", "SkipVARStyle", "make_policy", "SampleStats", "ScaleStats",
]
