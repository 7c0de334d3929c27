"""Per-sample sampling settings, classifier-free guidance on logits, and bitwise sampling.

Sampling reproduces the official ``sample_with_top_k_top_p_also_inplace_modifying_logits_``
call for one image: one ``torch.multinomial`` per scale over the (L * d_t, 2) bit-pair
matrix with a generator seeded by the sample's seed on the model's device. The official
code draws a whole batch from one generator; a generator per sample makes every image
independent of what it is batched with, and equals the official draw for batch size 1 (the
only size the official scripts use). A pruned scale (``sample_kept_bits_``) draws over the whole
grid so that its kept tokens meet the random numbers of the unpruned draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one sample. Constant over scales, as in every official entry point."""

    cfg: float = 3.0
    """Guidance scale on logits: cfg * cond + (1 - cfg) * uncond. 1 disables the unconditional branch."""
    tau: float = 1.0
    """Temperature: logits are multiplied by 1 / tau before guidance."""
    top_k: int = 900
    """0 disables; on two-way bit logits any value >= 2 keeps both."""
    top_p: float = 0.97
    """0 disables; a bit whose minor probability is <= 1 - top_p becomes deterministic."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cfg <= 100.0:
            raise ValueError(f"cfg must be in [0, 100], got {self.cfg}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def uses_uncond(self) -> bool:
        return self.cfg != 1.0


def guidance_weights(params: list[SamplingParams], device: torch.device) -> tuple[torch.Tensor, ...]:
    """float32 (B, 1, 1) tensors: 1/tau, cfg and 1 - cfg, each rounded from double like the official scalars."""
    def col(vals: list[float]) -> torch.Tensor:
        return torch.tensor(vals, dtype=torch.float32, device=device).view(-1, 1, 1)
    return col([1 / p.tau for p in params]), col([p.cfg for p in params]), col([1 - p.cfg for p in params])


def make_generators(params: list[SamplingParams], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(p.seed) for p in params]


def sample_bits_(logits_LdV: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Sample one bit per (token, bit) pair of guided logits (L, d, 2); modifies the logits in place.

    Returns int64 (L, d). Index 1 of the last axis is the logit of bit value 1.
    """
    length, d, v = logits_LdV.shape
    logits = logits_LdV.view(1, length * d, v)
    if top_k > 0:
        k = min(top_k, v)
        kth = logits.topk(k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, v)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(length, d)


def sample_kept_bits_(logits_KdV: torch.Tensor, keep_idx_K: torch.Tensor, length: int, top_k: int, top_p: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Sample the kept tokens of a pruned scale of ``length`` tokens with the random numbers they
    would have drawn unpruned. Returns int64 (K, d).

    ``torch.multinomial`` with one sample draws an exponential variate per matrix entry, in order,
    whatever the probabilities; so the draw covers the whole (length, d, 2) grid, the kept logits at
    their positions and even logits elsewhere: every kept bit meets the variate of its position in
    the unpruned run, and the generator ends in the unpruned run's state, so later scales draw the
    same numbers too. (Sampling only the K kept rows would shift every later variate: a pruned image
    would then differ from the unpruned one of its seed by a new draw, not by what pruning changed.)
    ``K == 0``: the generator still advances as the unpruned scale's draw.
    """
    _, d, v = logits_KdV.shape
    full_LdV = logits_KdV.new_zeros(length, d, v)
    full_LdV[keep_idx_K] = logits_KdV
    return sample_bits_(full_LdV, top_k, top_p, generator)[keep_idx_K]
