"""The assembled model a generation loop runs: transformer, VAE, text encoder and precision."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from .configs import ModelPreset
from .text_cond import TextCond
from .transformer import InfinityTransformer
from .vae import BSQVAE


class TextEncoder(Protocol):
    """Turns prompts into per-token features; flan-t5-xl for the real models."""

    def encode(self, prompts: list[str]) -> TextCond: ...


@dataclass
class InfinityModel:
    preset: ModelPreset
    transformer: InfinityTransformer
    vae: BSQVAE
    text_encoder: TextEncoder | None = None
    compute_dtype: torch.dtype = torch.float32
    """bfloat16: run under autocast with bf16 blocks (the official inference); float32: plain fp32."""

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_start.device

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.compute_dtype == torch.bfloat16)

    def encode_prompts(self, prompts: list[str]) -> TextCond:
        if self.text_encoder is None:
            raise ValueError(f"model {self.preset.name} has no text encoder configured")
        return self.text_encoder.encode(prompts).to(self.device)
