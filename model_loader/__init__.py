"""Our implementation of Infinity (bitwise VAR transformer, BSQ VAE, T5 text path)."""

from .configs import PRESETS, ModelPreset, TransformerConfig, VAEConfig, get_preset
from .text_cond import TextCond
from .transformer import InfinityTransformer, build_transformer
from .vae import BSQVAE, build_vae

__all__ = [
    "PRESETS", "ModelPreset", "TransformerConfig", "VAEConfig", "get_preset", "TextCond",
    "InfinityTransformer", "build_transformer", "BSQVAE", "build_vae",
]
