"""Our implementation of Infinity (bitwise VAR transformer, BSQ VAE, T5 text path).

Submodules that need torch are imported lazily, so torch-free processes (the HTTP API) can
use ``model_loader.configs`` and ``model_loader.schedules``.
"""

from importlib import import_module

_EXPORTS = {
    "PRESETS": "configs", "ModelPreset": "configs", "TransformerConfig": "configs", "VAEConfig": "configs",
    "get_preset": "configs", "TextCond": "text_cond", "InfinityTransformer": "transformer",
    "build_transformer": "transformer", "BSQVAE": "vae", "build_vae": "vae",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
