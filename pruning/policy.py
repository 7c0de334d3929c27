"""Pruning policies: per sample, which tokens to compute and whether the uncond branch runs.

The loop asks each sample's policy before a scale (``plan``) and tells it the logits after
(``observe``). A policy instance belongs to one sample of one batch; ``reset`` starts it.
``NoPruning`` is the reference: every token, both branches, bit-identical to the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .config import PruningConfig
from .scoring import (
    bit_entropy,
    distance_from_mean,
    lhep_energy,
    rank_sum,
    select_by_cumulative_energy,
    select_top_fraction,
    select_top_k,
    smooth_and_resize,
)


@dataclass
class ScaleContext:
    scale_idx: int
    grids: tuple[tuple[int, int], ...]
    prev_residual_Dhw: torch.Tensor | None
    """Residual code map sampled at the previous scale, at its VAE grid (None at scale 0)."""
    inputs_Ld: torch.Tensor | None
    """This scale's input features (the accumulated codes resized), before embedding."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.grids[self.scale_idx]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class ScalePlan:
    keep_idx_K: torch.Tensor | None = None
    """Ascending token indices to compute; None computes every token."""
    run_uncond: bool = True
    fill_from_scale: int | None = None
    """Skipped tokens take this earlier scale's residual (nearest); None: the previous scale."""
    zero_fill: bool = False
    """Skipped tokens add nothing (their residual is zero)."""


@dataclass
class ScaleObservation:
    cond_logits_KV: torch.Tensor
    """Conditional logits (after 1/tau) of the computed tokens."""
    uncond_logits_KV: torch.Tensor | None
    """Unconditional logits of the same tokens, None if the branch did not run."""


class PruningPolicy(Protocol):
    name: str

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None: ...
    def plan(self, ctx: ScaleContext) -> ScalePlan: ...
    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None: ...


class NoPruning:
    name = "none"

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None:
        pass

    def plan(self, ctx: ScaleContext) -> ScalePlan:
        return ScalePlan()

    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None:
        pass


def guidance_discrepancy(cond_KV: torch.Tensor, uncond_KV: torch.Tensor) -> float:
    """Delta_k: root-mean-square of (l_cond - l_uncond) over computed tokens and all bit logits."""
    return float((cond_KV.float() - uncond_KV.float()).pow(2).mean().sqrt())


def relative_change(delta: float, prev_delta: float, eps: float) -> float:
    """gamma_k = |Delta_k - Delta_{k-1}| / (Delta_{k-1} + eps)."""
    return abs(delta - prev_delta) / (prev_delta + eps)


class LDPruning:
    """LHEP (where to refine) + SATS (when to stop the unconditional branch), per sample."""

    name = "ld-pruning"

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.reset(())

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None:
        n = len(grids)
        if n:
            self.config.check_schedule(n)
        self.lhep_scales = self.config.lhep_set(grids)
        self.sats_scales = self.config.sats_set(grids)
        # Delta is also measured one scale before the first SATS scale so gamma exists there
        self.measure_scales = self.sats_scales | {min(self.sats_scales) - 1} if self.sats_scales else frozenset()
        self.prev_delta: float | None = None
        self.stopped_at: int | None = None
        self.gammas: dict[int, float] = {}
        # token_score "energy+entropy": each token's latest bit entropy, at the grid of the last scale
        # observed, and the tokens the current plan computes (None: all)
        self.entropy_hw: torch.Tensor | None = None
        self.computed_K: torch.Tensor | None = None

    def plan(self, ctx: ScaleContext) -> ScalePlan:
        cfg = self.config
        if cfg.force_stop_scale is not None and ctx.scale_idx >= cfg.force_stop_scale and self.stopped_at is None:
            self.stopped_at = ctx.scale_idx
        run_uncond = self.stopped_at is None
        self.computed_K = None
        if ctx.scale_idx not in self.lhep_scales or ctx.prev_residual_Dhw is None:
            return ScalePlan(run_uncond=run_uncond)
        energy = lhep_energy(ctx.prev_residual_Dhw, ctx.grid, cfg.energy_interp, cfg.energy_smoothing)
        if cfg.force_keep_fraction is not None:
            keep = select_top_fraction(energy, cfg.force_keep_fraction)
        else:
            keep = select_by_cumulative_energy(energy, cfg.energy_keep_ratio)
        if keep.numel() == ctx.num_tokens:
            keep = None
        elif cfg.token_score == "energy+entropy" and self.entropy_hw is not None:
            score = rank_sum(energy, self._entropy_at(ctx.grid).to(energy.device))
            keep = select_top_k(score, keep.numel())
        self.computed_K = keep
        return ScalePlan(keep_idx_K=keep, run_uncond=run_uncond, zero_fill=cfg.fill_mode == "zero")

    def _entropy_at(self, grid: tuple[int, int]) -> torch.Tensor:
        """The latest bit entropy of every token, resized (bilinear) to ``grid``, flattened."""
        return smooth_and_resize(self.entropy_hw, grid, "bilinear", smooth="never").flatten()

    def _observe_entropy(self, ctx: ScaleContext, cond_KV: torch.Tensor) -> None:
        ent_K = bit_entropy(cond_KV)
        if self.computed_K is None:
            self.entropy_hw = ent_K.view(ctx.grid)
            return
        # tokens this scale skipped keep the entropy they had at the latest scale that computed them
        ent_L = (self._entropy_at(ctx.grid) if self.entropy_hw is not None
                 else torch.zeros(ctx.num_tokens, device=ent_K.device)).to(ent_K.device)
        ent_L[self.computed_K.to(ent_K.device)] = ent_K
        self.entropy_hw = ent_L.view(ctx.grid)

    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None:
        si = ctx.scale_idx
        if self.config.token_score == "energy+entropy" and obs.cond_logits_KV.numel():
            self._observe_entropy(ctx, obs.cond_logits_KV)
        if obs.uncond_logits_KV is None or si not in self.measure_scales or obs.cond_logits_KV.numel() == 0:
            return
        delta = guidance_discrepancy(obs.cond_logits_KV, obs.uncond_logits_KV)
        if si in self.sats_scales and self.prev_delta is not None:
            gamma = relative_change(delta, self.prev_delta, self.config.eps)
            self.gammas[si] = gamma
            if gamma < self.config.uncond_stop_tol and self.stopped_at is None:
                self.stopped_at = si + 1  # decided from scale k's logits, applied from k+1 on
        self.prev_delta = delta


class FastVARStyle:
    """FastVAR-style baseline: fixed keep ratios at fixed scales (relative to the end), tokens
    scored by distance from the token map's mean, skipped tokens restored from a cached
    earlier scale (the last fully computed one), nearest-upsampled. A ratio of 0 skips a scale.
    """

    name = "fastvar"

    def __init__(self, keep_ratios: dict[int, float] | None = None) -> None:
        # default: 1024-px FastVAR on Infinity (keep 60% at 32x32, 50% at 40x40, skip 48 and 64)
        self.keep_ratios = keep_ratios or {-4: 0.6, -3: 0.5, -2: 0.0, -1: 0.0}

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None:
        n = len(grids)
        self.ratios = {(k % n): v for k, v in self.keep_ratios.items()}
        self.cache_scale = min(self.ratios) - 1 if self.ratios else None

    def plan(self, ctx: ScaleContext) -> ScalePlan:
        ratio = self.ratios.get(ctx.scale_idx)
        if ratio is None or ctx.inputs_Ld is None:
            return ScalePlan()
        if ratio == 0.0:  # FastVAR's released Infinity code skips these scales: no residual at all
            return ScalePlan(keep_idx_K=torch.zeros(0, dtype=torch.long), zero_fill=True)
        keep = select_top_fraction(distance_from_mean(ctx.inputs_Ld), ratio)
        return ScalePlan(keep_idx_K=keep, fill_from_scale=self.cache_scale)

    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None:
        pass


class SkipVARStyle:
    """SkipVAR-style static baseline: stop the unconditional branch from a fixed scale and
    optionally skip the last scales entirely (their residual is zero)."""

    name = "skipvar"

    def __init__(self, stop_uncond_from: int = -3, skip_last: int = 0) -> None:
        self.stop_uncond_from, self.skip_last = stop_uncond_from, skip_last

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None:
        n = len(grids)
        self.stop_at = self.stop_uncond_from % n
        self.skip_from = n - self.skip_last

    def plan(self, ctx: ScaleContext) -> ScalePlan:
        run_uncond = ctx.scale_idx < self.stop_at
        if ctx.scale_idx >= self.skip_from:
            return ScalePlan(keep_idx_K=torch.zeros(0, dtype=torch.long), run_uncond=run_uncond, zero_fill=True)
        return ScalePlan(run_uncond=run_uncond)

    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None:
        pass


def make_policy(config: PruningConfig | None) -> PruningPolicy:
    if config is None or not config.enabled:
        return NoPruning()
    return LDPruning(config)
