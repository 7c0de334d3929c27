"""The ``demo`` preset: a small Infinity (BSQ VAE d16 + 6-block transformer) for the procedural data.

Weights folder layout (written by ``python -m demo.train``)::

    <weights_dir>/vae.safetensors          BSQVAE state dict (our key names)
    <weights_dir>/transformer.safetensors  InfinityTransformer state dict
    <weights_dir>/text_encoder/            tiny T5 (HF folder) whose tokenizer covers the demo grammar
    <weights_dir>/{vae,transformer}.json   config, arguments and losses of the training runs
"""

from __future__ import annotations

import logging
from pathlib import Path

from model_loader.configs import ModelPreset, get_preset, register_preset
from model_loader.tiny_t5 import SPECIAL_TOKENS, build_tiny_t5

from .dataset import vocabulary

logger = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_T5_D_MODEL = 256
DEMO_T5_SEED = 0

DEMO_PRESET: ModelPreset = get_preset(DEMO_NAME)  # defined with the other presets in model_loader.configs
DEMO_VAE, DEMO_TRANSFORMER = DEMO_PRESET.vae, DEMO_PRESET.transformer
DEMO_FILES: dict[str, str] = dict(DEMO_PRESET.default_files)


def demo_vocab() -> list[str]:
    """The tiny T5 vocabulary: T5's special tokens, then every word of the demo grammar."""
    return [*SPECIAL_TOKENS, *vocabulary()]


def build_demo_text_encoder(folder: str | Path) -> Path:
    """Write the demo's frozen tiny T5 (seeded random weights, grammar vocabulary) into ``folder``."""
    return build_tiny_t5(folder, d_model=DEMO_T5_D_MODEL, seed=DEMO_T5_SEED, vocab=demo_vocab())


def demo_file_paths(weights_dir: str | Path) -> dict[str, Path]:
    root = Path(weights_dir)
    return {k: root / v for k, v in DEMO_FILES.items()}


def register_demo_preset(weights_dir: str | Path | None = None) -> ModelPreset:
    """Register the ``demo`` preset; with a weights folder, warn about the files it lacks."""
    if weights_dir is not None:
        missing = [str(p) for p in demo_file_paths(weights_dir).values() if not p.exists()]
        if missing:
            logger.warning("demo weights folder %s lacks %s", weights_dir, ", ".join(missing))
    return register_preset(DEMO_PRESET)
