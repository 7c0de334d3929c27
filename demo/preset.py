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

from model_loader.configs import ModelPreset, SamplingDefaults, TransformerConfig, VAEConfig, register_preset
from model_loader.text_encoder import TINY_T5_NAME
from model_loader.tiny_t5 import SPECIAL_TOKENS, build_tiny_t5

from .dataset import vocabulary

logger = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_T5_D_MODEL = 256
DEMO_T5_SEED = 0

DEMO_VAE = VAEConfig(codebook_bits=16, patch_size=16, encoder_ch_mult=(1, 1, 2, 2, 4),
                     decoder_ch_mult=(1, 1, 2, 2, 4), base_ch=32, num_res_blocks=1)
DEMO_TRANSFORMER = TransformerConfig(depth=6, embed_dim=256, num_heads=4, block_chunks=2, token_bits=16,
                                     text_channels=DEMO_T5_D_MODEL, text_maxlen=64)
DEMO_FILES: dict[str, str] = {"transformer": "transformer.safetensors", "vae": "vae.safetensors",
                              "text_encoder": "text_encoder"}

DEMO_PRESET = ModelPreset(
    name=DEMO_NAME, transformer=DEMO_TRANSFORMER, vae=DEMO_VAE, spatial_patchify=False, pn="0.06M",
    sampling=SamplingDefaults(cfg=3.0, tau=1.0), checkpoint_layout="safetensors", default_files=dict(DEMO_FILES),
    text_encoder=TINY_T5_NAME,
    description="Demo Infinity trained on procedural shapes (256 px, 7 scales, VAE d16); CPU default",
)


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
