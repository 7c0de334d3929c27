"""Per-request LD-Pruning settings: a validated frozen config and named presets.

Paper symbols: rho = ``energy_keep_ratio`` (LHEP), delta = ``uncond_stop_tol`` (SATS).
Scale sets are relative to the end of the schedule by default (project decision, ld-pruning.md
section 4): LHEP on the fewest last scales that hold ``LHEP_TOKEN_SHARE`` of the schedule's tokens,
SATS on the last 4. At every aspect ratio of the 512, 768 and 1024 px schedules the LHEP set is
their last 3 scales (the paper's set at 1024x1024: 76 % of the tokens); on the 7-scale 256 px
schedule (the demo's) it is the last 2 (77 %), where the last 3 would hold 89 % and take in the 8x8
scale, which still places the figures. Explicit counts or absolute scale sets override them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from model_loader.schedules import scale_offsets

EnergyInterp = Literal["bilinear", "nearest"]
FillMode = Literal["nearest", "zero"]
EnergySmoothing = Literal["always", "auto", "never"]
TokenScore = Literal["energy", "energy+entropy"]

LHEP_TOKEN_SHARE = 0.7
"""Default LHEP set: the fewest last scales holding this share of the schedule's tokens (0.70 and
0.72 give the same sets on every schedule template; 0.75 would take a 4th scale at some ratios)."""


@dataclass(frozen=True)
class PruningConfig:
    """LD-Pruning settings of one sample (all fields optional: defaults are the paper's, but for the
    fill of skipped tokens, ``fill_mode``)."""

    lhep: bool = True
    """Latent high-frequency energy pruning: recompute only high-energy tokens at detail scales."""
    energy_keep_ratio: float = 0.5
    """rho: keep the highest-energy tokens that hold this fraction of the scale's total energy."""
    lhep_last_scales: int | None = None
    """LHEP on this many last scales; None: the fewest holding ``LHEP_TOKEN_SHARE`` of the tokens."""
    lhep_scales: tuple[int, ...] | None = None
    """Absolute scale indices; overrides lhep_last_scales."""
    sats: bool = True
    """Semantic-adaptive termination: stop the unconditional branch once guidance has converged."""
    uncond_stop_tol: float = 0.15
    """delta: stop when the relative change of the guidance discrepancy falls below this."""
    sats_last_scales: int = 4
    sats_scales: tuple[int, ...] | None = None
    """Absolute scale indices; overrides sats_last_scales."""
    eps: float = 1e-6
    energy_interp: EnergyInterp = "bilinear"
    """Resampling of the smoothed energy map to the scale's grid."""
    energy_smoothing: EnergySmoothing = "auto"
    """The 3x3 average of the Haar energy map before resizing: ``always`` (the paper), ``never``, or
    ``auto`` (project decision: maps of 8 or more cells a side only, so every map of the default
    scales at 1024 px and at 512/768 px square, the paper's among them). On smaller maps the average
    spans half the image side or more: on the demo (maps of 3 to 6 cells) the quarter of the tokens
    it ranks first holds 20 / 28 / 55 % of the pixel change that removing each token causes at the
    8x8 / 12x12 / 16x16 scales (random 26-28 %), unaveraged 66 / 65 / 73 % (oracle 90-91 %;
    ``benchmarks.lhep_oracle``, stage-16 weights, demo/weights/MODEL_CARD.md)."""
    token_score: TokenScore = "energy"
    """Which of LHEP's tokens are computed: the highest-energy ones (``energy``, the paper's), or as
    many (the count still set by rho on the energy) ranked by the sum of their energy rank and the
    rank of their bits' entropy under the conditional logits at the latest scale that computed them
    (``energy+entropy``, project option): where the model was unsure, a later scale has more to fix.
    Demo, stage 16, 128 held-out images: `balanced` adherence -0.150 against the unpruned image
    instead of -0.208 at the same FLOPs and PSNR (SATS off: -0.133 against -0.195, paired gain +0.061
    +- 0.011); at rho 0.7 -0.078 against -0.083, at rho 0.8 (SATS off) a paired +0.003 +- 0.005. It
    departs from the paper's method and is not measured on the real 2B/8B weights: not the default."""
    fill_mode: FillMode = "zero"
    """Skipped tokens add nothing to the latent (``zero``, project decision), or the previous
    residual upsampled nearest (``nearest``, the paper's fill). The multi-scale quantizer's codes
    have unit norm at every scale, so where the residual is small a code overshoots and the next
    scale's code tends to point the other way: on the demo, the VAE's own codes at the last scale
    agree with the upsampled previous code on 27 % of the bits at low-energy tokens (the sampled
    ones 31 %), so copying it moves those tokens away from the unpruned result, and adding nothing
    is closer (demo, stage-9 weights: +1.0 dB PSNR at the same rho, and fewer tokens kept at the next
    scale; stage 16: within 0.1 dB and 0.01 adherence of the paper's fill at equal FLOPs; model card)."""
    force_keep_fraction: float | None = None
    """Benchmarks only: keep exactly this fraction of tokens (highest energy first) at LHEP scales."""
    force_stop_scale: int | None = None
    """Benchmarks only: stop the unconditional branch from this scale on, whatever the discrepancy."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"pruning.{field}: {why} (got {getattr(self, field)!r})")

        if not 0.0 < self.energy_keep_ratio <= 1.0:
            bad("energy_keep_ratio", "must be in (0, 1]")
        if not 0.0 <= self.uncond_stop_tol <= 10.0:
            bad("uncond_stop_tol", "must be in [0, 10]")
        if self.lhep_last_scales is not None and not (isinstance(self.lhep_last_scales, int)
                                                      and 0 <= self.lhep_last_scales <= 13):
            bad("lhep_last_scales", "must be in [0, 13] or None")
        if not (isinstance(self.sats_last_scales, int) and 0 <= self.sats_last_scales <= 13):
            bad("sats_last_scales", "must be in [0, 13]")
        for name in ("lhep_scales", "sats_scales"):
            val = getattr(self, name)
            if val is not None and (any(not 0 <= s < 13 for s in val) or len(set(val)) != len(val)):
                bad(name, "must be distinct scale indices in [0, 13)")
        if self.lhep_scales is not None and 0 in self.lhep_scales:
            bad("lhep_scales", "scale 0 has no previous residual to score")
        if self.sats_scales is not None and 0 in self.sats_scales:
            bad("sats_scales", "scale 0 has no earlier discrepancy to compare with")
        if not self.eps > 0:
            bad("eps", "must be positive")
        if self.energy_interp not in ("bilinear", "nearest"):
            bad("energy_interp", "must be 'bilinear' or 'nearest'")
        if self.energy_smoothing not in ("always", "auto", "never"):
            bad("energy_smoothing", "must be 'always', 'auto' or 'never'")
        if self.token_score not in ("energy", "energy+entropy"):
            bad("token_score", "must be 'energy' or 'energy+entropy'")
        if self.fill_mode not in ("nearest", "zero"):
            bad("fill_mode", "must be 'nearest' or 'zero'")
        if self.force_keep_fraction is not None and not 0.0 < self.force_keep_fraction <= 1.0:
            bad("force_keep_fraction", "must be in (0, 1]")
        if self.force_stop_scale is not None and not 1 <= self.force_stop_scale < 13:
            bad("force_stop_scale", "must be in [1, 13)")

    def check_schedule(self, num_scales: int) -> None:
        """ValueError naming the field if an absolute scale index is past a ``num_scales`` schedule's
        end (it would silently do nothing there)."""
        for name in ("lhep_scales", "sats_scales"):
            past = sorted(s for s in getattr(self, name) or () if s >= num_scales)
            if past:
                raise ValueError(f"pruning.{name}: scale(s) {past} past the end of this {num_scales}-scale schedule")
        if self.force_stop_scale is not None and self.force_stop_scale >= num_scales:
            raise ValueError(f"pruning.force_stop_scale: {self.force_stop_scale} is past the end of this "
                             f"{num_scales}-scale schedule")

    def lhep_set(self, grids: tuple[tuple[int, int], ...]) -> frozenset[int]:
        """LHEP's scale indices on the schedule ``grids``."""
        num_scales = len(grids)
        if not self.lhep:
            return frozenset()
        if self.lhep_scales is not None:
            return frozenset(s for s in self.lhep_scales if s < num_scales)
        last = self.lhep_last_scales
        if last is None:  # tokens of the last k scales: total - offsets[n - k]
            offsets = scale_offsets(grids)
            total = offsets[-1]
            share = LHEP_TOKEN_SHARE * total
            last = next((k for k in range(1, num_scales) if total - offsets[num_scales - k] >= share), num_scales - 1)
        return frozenset(range(max(1, num_scales - last), num_scales))

    def sats_set(self, grids: tuple[tuple[int, int], ...]) -> frozenset[int]:
        """SATS's scale indices on the schedule ``grids``."""
        num_scales = len(grids)
        if not self.sats:
            return frozenset()
        if self.sats_scales is not None:
            return frozenset(s for s in self.sats_scales if s < num_scales)
        return frozenset(range(max(1, num_scales - self.sats_last_scales), num_scales))

    @property
    def enabled(self) -> bool:
        return self.lhep or self.sats or self.force_stop_scale is not None

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, PruningConfig] = {
    # no pruning: bit-identical to the unpruned model
    "off": PruningConfig(lhep=False, sats=False),
    # keep 70% of the detail energy and stop guidance only once it is very flat: closest to unpruned
    "quality": PruningConfig(energy_keep_ratio=0.7, uncond_stop_tol=0.08),
    # the paper's defaults (rho 0.5, delta 0.15): 1.73x on Infinity-2B, 2.35x on 8B at 1024 (H100)
    "balanced": PruningConfig(),
    # LHEP on the last scale only (rho 0.5), SATS as balanced: the least drift of the pruning presets;
    # the demo model's default, whose earlier detail scales draw the shapes themselves (model card)
    "light": PruningConfig(lhep_last_scales=1),
    # fewer kept tokens on four detail scales and an earlier stop: fastest, most drift from unpruned
    "fast": PruningConfig(energy_keep_ratio=0.35, lhep_last_scales=4, uncond_stop_tol=0.3),
}


def get_pruning_preset(name: str) -> PruningConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"pruning: unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def pruning_config(preset: str | None = None, **overrides) -> PruningConfig:
    """A preset (default 'balanced') with explicit field overrides, validated."""
    base = get_pruning_preset(preset or "balanced")
    unknown = set(overrides) - set(base.to_dict())
    if unknown:
        raise ValueError(f"pruning: unknown field(s) {sorted(unknown)}")
    return replace(base, **overrides)
