"""Pure tensor functions that score and select tokens (no model, no state).

LHEP (ld-pruning.md section 2): Haar high-frequency energy of the previous residual code map,
smoothed with a 3x3 average and resized to the scale's grid, then a cumulative-energy
threshold. FastVAR-style scoring: squared distance of each token from the token map's mean.
Bit entropy of a scale's logits and rank sums: the optional ``token_score="energy+entropy"`` ranking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# 2x2 high-pass Haar kernels: LH, HL, HH
_HAAR = 0.5 * torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]],
                            [[-1.0, -1.0], [1.0, 1.0]],
                            [[-1.0, 1.0], [1.0, -1.0]]])


def haar_energy(residual_Dhw: torch.Tensor) -> torch.Tensor:
    """Sum over the three high-pass Haar responses (stride 2) and all channels of the squares.

    Odd sides are padded to even by edge replication first. Returns (ceil(h/2), ceil(w/2)).
    """
    d, h, w = residual_Dhw.shape
    x = residual_Dhw.float().unsqueeze(1)  # (D, 1, h, w): every channel filtered alike
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    kernels = _HAAR.to(x.device).unsqueeze(1)  # (3, 1, 2, 2)
    resp = F.conv2d(x, kernels, stride=2)  # (D, 3, h/2, w/2)
    return resp.pow(2).sum(dim=(0, 1))


SMOOTH_MIN_SIDE = 8
"""``smooth="auto"`` averages energy maps whose shorter side is at least this many cells: every map
LHEP's default scales give at 1024 px (any aspect ratio; square: 16 to 24 cells a side, the
paper's) and at 512 and 768 px square; not the 3x3 to 6x6 maps of the demo's 7-scale schedule,
where a 3x3 average spans half the image side or more."""


def smooth_and_resize(energy_hw: torch.Tensor, grid: tuple[int, int], mode: str = "bilinear",
                      smooth: str = "always") -> torch.Tensor:
    """3x3 average (stride 1, zero padding counted, as nn.AvgPool2d) then resize to ``grid``.

    ``smooth``: "always" (the paper), "never", or "auto" (only maps with both sides >= SMOOTH_MIN_SIDE).
    """
    e = energy_hw[None, None]
    if smooth == "always" or (smooth == "auto" and min(e.shape[-2:]) >= SMOOTH_MIN_SIDE):
        e = F.avg_pool2d(e, kernel_size=3, stride=1, padding=1)
    if tuple(e.shape[-2:]) != tuple(grid):
        kw = {"align_corners": False} if mode == "bilinear" else {}
        e = F.interpolate(e, size=tuple(grid), mode=mode, **kw)
    return e[0, 0]


def select_by_cumulative_energy(energy_L: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of tokens with energy >= tau, where tau is the last value of the
    shortest descending-sorted prefix holding ``keep_ratio`` of the total energy.

    keep_ratio >= 1 keeps every token (a float cumulative sum need not reach the total exactly).
    """
    n = energy_L.numel()
    if keep_ratio >= 1.0 or n == 0:
        return torch.arange(n, device=energy_L.device)
    sorted_e, _ = energy_L.sort(descending=True)
    csum = sorted_e.double().cumsum(0)
    target = keep_ratio * float(csum[-1])
    count = int(torch.searchsorted(csum, torch.tensor([target], dtype=csum.dtype, device=csum.device)).item()) + 1
    tau = sorted_e[min(count, n) - 1]
    return torch.nonzero(energy_L >= tau).flatten()


def select_top_k(score_L: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` highest scores; ties broken by position."""
    if k >= score_L.numel():
        return torch.arange(score_L.numel(), device=score_L.device)
    return torch.argsort(score_L, descending=True, stable=True)[:k].sort().values


def select_top_fraction(score_L: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the ceil(fraction * L) highest scores; ties broken by position."""
    n = score_L.numel()
    return select_top_k(score_L, min(n, max(0, math.ceil(fraction * n - 1e-9))))


def distance_from_mean(tokens_LC: torch.Tensor) -> torch.Tensor:
    """FastVAR's pivotal-token score: squared L2 distance of each token from the map's mean."""
    x = tokens_LC.float()
    return (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1)


def lhep_energy(prev_residual_Dhw: torch.Tensor, token_grid: tuple[int, int], mode: str = "bilinear",
                smooth: str = "always") -> torch.Tensor:
    """Per-token energy (h*w,) of the scale with ``token_grid`` from the previous residual code map.

    For patchified models the residual is at VAE resolution (2h x 2w): the stride-2 Haar
    transform then yields one value per token of the previous scale, as decided in ld-pruning.md.
    """
    return smooth_and_resize(haar_energy(prev_residual_Dhw), token_grid, mode, smooth).flatten()


def bit_entropy(logits_KV: torch.Tensor) -> torch.Tensor:
    """Per token (K,): the summed entropy (nats) of its bits under ``logits_KV`` (K, 2 * bits), a
    (bit 0, bit 1) logit pair per bit, as the sampler reads them."""
    logp = F.log_softmax(logits_KV.float().view(logits_KV.shape[0], -1, 2), dim=-1)
    return -(logp.exp() * logp).sum(dim=(-1, -2))


def rank_sum(*scores_L: torch.Tensor) -> torch.Tensor:
    """Sum over the scores of each token's ascending rank (0 for the lowest; ties broken by position)."""
    out = torch.zeros(scores_L[0].shape, dtype=torch.float32, device=scores_L[0].device)
    for s in scores_L:
        order = torch.argsort(s, stable=True)
        out[order] += torch.arange(s.numel(), dtype=torch.float32, device=s.device)
    return out
