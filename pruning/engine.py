"""The engine facade: prompts and per-request settings in, RGB images and statistics out.

This is the only object the service worker talks to. It owns one ``InfinityModel`` (one per
GPU), encodes prompts, builds one pruning policy per sample and runs ``pruning.loop.generate``
for a batch that shares one scale schedule; everything else (guidance, temperature, top-k/p,
seed, pruning settings, negative prompt) may differ per sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_loader.configs import ModelPreset, get_preset
from model_loader.model import InfinityModel
from model_loader.sampling import SamplingParams
from model_loader.schedules import image_size, nearest_template, scale_schedule
from model_loader.text_cond import TextCond

from .config import PruningConfig
from .cuda_graphs import ScaleGraphs
from .loop import ScaleCallback, generate
from .policy import FastVARStyle, NoPruning, PruningPolicy, SkipVARStyle, make_policy
from .stats import SampleStats

log = logging.getLogger(__name__)
GRAPH_TEXT_BUCKET = 32


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pruning: PruningConfig | None = None
    """None or a disabled config: no pruning (bit-identical to the unpruned model)."""
    negative_prompt: str | None = None
    baseline: str | None = None
    """Benchmarks: 'fastvar' or 'skipvar' replaces LD-Pruning with a peer baseline policy."""


@dataclass
class ImageResult:
    image_HW3: torch.Tensor
    """uint8 RGB."""
    stats: SampleStats
    prompt_truncated: bool = False
    stopped: bool = False
    """Its request was stopped mid-batch (``Engine.generate``'s ``stopped``): no image (zeros)."""
    text_tokens: int = 0
    """Tokens the text encoder read for it (after truncation, with EOS): its prompt's, plus its
    negative prompt's when it has one (a usage figure, as OpenAI's ``input_tokens``)."""


@dataclass
class BatchTiming:
    text_s: float
    generate_s: float


def grids_for(h_div_w: float, pn: str) -> tuple[tuple[int, int], ...]:
    """The official schedule of the template nearest to ``h_div_w`` at resolution key ``pn``."""
    return scale_schedule(nearest_template(h_div_w), pn)


def policy_for(req: ImageRequest) -> PruningPolicy:
    if req.baseline == "fastvar":
        return FastVARStyle()
    if req.baseline == "skipvar":
        return SkipVARStyle()
    if req.baseline is not None:
        raise ValueError(f"baseline must be 'fastvar' or 'skipvar', got {req.baseline!r}")
    return make_policy(req.pruning) if req.pruning is not None else NoPruning()


class Engine:
    def __init__(self, model: InfinityModel, cuda_graphs: bool | None = None) -> None:
        """``cuda_graphs``: replay unpruned scale forwards from CUDA graphs (None: on a CUDA device)."""
        self.model = model
        self.last_timing = BatchTiming(0.0, 0.0)
        self.graphs: ScaleGraphs | None = None
        self.set_cuda_graphs(model.device.type == "cuda" if cuda_graphs is None else cuda_graphs)

    def set_cuda_graphs(self, enabled: bool) -> None:
        if enabled and self.model.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        # text lengths rounded up to 32: prompts of 1-32, 33-64, ... tokens share their graphs
        self.graphs = ScaleGraphs(self.model, text_bucket=GRAPH_TEXT_BUCKET) if enabled else None

    @property
    def preset(self) -> ModelPreset:
        return self.model.preset

    @classmethod
    def from_preset(cls, preset: str | ModelPreset, *, transformer_path: str | Path | None = None,
                    vae_path: str | Path | None = None, text_encoder_path: str | Path | None = None,
                    device: str = "cpu", dtype_policy: str = "official", seed: int = 0,
                    pad_text_to_max: bool | None = None) -> Engine:
        """Load a preset's weights, or build seeded random weights when no paths are given
        (only allowed for presets whose text encoder is the built-in tiny one).
        ``pad_text_to_max``: T5 on 512 padded positions as the official code (default for flan-t5),
        or on the batch's longest prompt (default for the tiny T5, which has no official features
        to match; on the demo model that took text encoding from 54 to 4 ms)."""
        from model_loader.checkpoint import check_policy, load_model
        from model_loader.checkpoint_io import checkpoint_files
        from model_loader.random_init import random_model
        from model_loader.text_encoder import load_text_encoder

        p = get_preset(preset) if isinstance(preset, str) else preset
        if pad_text_to_max is None:
            pad_text_to_max = p.text_encoder != "tiny-t5"
        # everything that can be checked without reading weights first: a typo in a path must not
        # cost a flan-t5-xl load (GBs) before it is reported, on every restart of a crash loop
        check_policy(dtype_policy)
        if transformer_path is None and vae_path is None:
            if p.text_encoder != "tiny-t5":
                raise ValueError(f"preset {p.name} needs transformer and VAE weights (transformer_path, vae_path)")
        elif transformer_path is None or vae_path is None:
            raise ValueError("give both transformer_path and vae_path, or neither (random weights)")
        else:
            checkpoint_files(vae_path)
            checkpoint_files(transformer_path)
        text = load_text_encoder(p.text_encoder, text_encoder_path, device,
                                 expected_channels=p.transformer.text_channels, pad_to_max_length=pad_text_to_max)
        if transformer_path is None:
            compute = torch.bfloat16 if dtype_policy == "bfloat16" else torch.float32
            return cls(random_model(p, seed=seed, device=device, compute_dtype=compute, text_encoder=text))
        return cls(load_model(p, transformer_path=transformer_path, vae_path=vae_path, device=device,
                              dtype_policy=dtype_policy, text_encoder=text))

    def encode(self, prompts: list[str]) -> tuple[TextCond, list[bool]]:
        enc = self.model.text_encoder
        if enc is None:
            raise ValueError(f"model {self.preset.name} has no text encoder")
        if hasattr(enc, "encode_with_info"):
            text, truncated = enc.encode_with_info(prompts)
        else:
            text, truncated = enc.encode(prompts), [False] * len(prompts)
        return text.to(self.model.device), truncated

    def _uncond_text(self, requests: list[ImageRequest], text: TextCond) -> tuple[TextCond | None, list[int]]:
        """Per sample: the negative prompt's features, or the learned cfg_uncond rows; and the
        negative prompt's token count (0 without one)."""
        negs = [r.negative_prompt for r in requests]
        if not any(negs):
            return None, [0] * len(requests)
        learned = self.model.transformer.uncond_text(text.lens_B.cpu()).to(self.model.device)
        neg_text, _ = self.encode([n or "" for n in negs])
        parts = [neg_text.select([i]) if n else learned.select([i]) for i, n in enumerate(negs)]
        neg_tokens = [int(k) if n else 0 for k, n in zip(neg_text.lens_B.tolist(), negs, strict=True)]
        return TextCond.cat(parts), neg_tokens

    def generate(self, requests: list[ImageRequest], grids: tuple[tuple[int, int], ...],
                 on_scale: ScaleCallback | None = None,
                 stopped: Callable[[], Collection[int]] | None = None) -> list[ImageResult]:
        """One batch at one schedule. Raises ValueError for invalid settings. ``on_scale``: called
        after each scale with a preview decoder; ``stopped``: the requests (indices) whose work ends
        where they are, the others going on as if alone (both: ``pruning.loop.generate``)."""
        if not requests:
            return []
        t0 = time.perf_counter()
        with torch.inference_mode():
            text, truncated = self.encode([r.prompt for r in requests])
            negative, neg_tokens = self._uncond_text(requests, text)
            text_tokens = [int(k) + n for k, n in zip(text.lens_B.tolist(), neg_tokens, strict=True)]
        t1 = time.perf_counter()
        out = generate(self.model, text, grids, [r.sampling for r in requests],
                       [policy_for(r) for r in requests], negative=negative, graphs=self.graphs,
                       on_scale=on_scale, stopped=stopped)
        self.last_timing = BatchTiming(t1 - t0, time.perf_counter() - t1)
        return [ImageResult(out.images_BHW3[i], out.stats[i], truncated[i], i in out.stopped, text_tokens[i])
                for i in range(len(requests))]

    def warmup(self, pn: str | None = None) -> float:
        """Run one tiny batch (both the unpruned and the pruned path); returns seconds."""
        t0 = time.perf_counter()
        grids = grids_for(1.0, pn or self.preset.pn)
        self.generate([ImageRequest("warm up", SamplingParams(seed=0)),
                       ImageRequest("warm up", SamplingParams(seed=1), PruningConfig())], grids)
        if self.graphs is not None:  # capture the commonest shape too: one prompt (<= 32 tokens), CFG
            self.generate([ImageRequest("warm up", SamplingParams(seed=2))], grids)
        return time.perf_counter() - t0

    def image_size(self, grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """Pixel (height, width) this model produces for a schedule."""
        return image_size(grids, self.preset.pixels_per_token)
