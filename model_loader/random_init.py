"""Seeded random weights for the tiny and benchmark presets (never for the real models).

Scales follow the reference fixtures so that every path is exercised and nothing is
degenerate (the official zero initialisations would make many paths trivial): linear and
conv weights normal with std 1/sqrt(fan_in) (AdaLN projections 0.5/sqrt(fan_in)), biases
std 0.05, norm weights 1 + 0.1 * normal, ada_gss std 0.3, start/level embeddings std 0.5,
cfg_uncond std 0.3, word embedding std 1, attention log-scales log(4) + 0.4 * normal.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .configs import ModelPreset
from .model import InfinityModel, TextEncoder
from .transformer import build_transformer
from .vae import build_vae


def _std_for(name: str, p: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the normal a parameter is drawn from."""
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0), 0.4
    if name.endswith("ada_gss"):
        return 0.0, 0.3
    if name in ("pos_start", "lvl_embed.weight"):
        return 0.0, 0.5
    if name == "cfg_uncond":
        return 0.0, 0.3
    if name.endswith("mat_q") and p.ndim == 3:
        return 0.0, 1.0
    if name == "word_embed.weight":
        return 0.0, 1.0
    if ("norm" in name) and name.endswith("weight") and p.ndim == 1:
        return 1.0, 0.1
    if p.ndim == 1:
        return 0.0, 0.05
    fan_in = p[0].numel()
    scale = 0.5 if ("shared_ada_lin" in name or "head_nm" in name) else 1.0
    return 0.0, scale / math.sqrt(fan_in)


@torch.no_grad()
def init_random_(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        mean, std = _std_for(name, p)
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
    return module


def random_model(preset: ModelPreset, *, seed: int = 0, device: str | torch.device = "cpu",
                 compute_dtype: torch.dtype = torch.float32, text_encoder: TextEncoder | None = None) -> InfinityModel:
    """A model of ``preset``'s shape with seeded random weights (bf16-representable, as the fixtures)."""
    tf = init_random_(build_transformer(preset.transformer, "cpu"), seed)
    vae = init_random_(build_vae(preset.vae, "cpu"), seed + 1)
    for m in (tf, vae):
        for p in m.parameters():
            p.data = p.data.bfloat16().float()  # values a bf16 checkpoint could hold
        m.eval().requires_grad_(False)
    if compute_dtype == torch.bfloat16:
        for blk in tf.blocks:
            blk.bfloat16()
    return InfinityModel(preset, tf.to(device), vae.to(device), text_encoder, compute_dtype)
