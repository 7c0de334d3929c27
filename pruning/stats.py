"""Per-sample generation statistics and the transformer FLOP model behind the ideal speedup.

FLOPs (2 per multiply-add; infinity-spec.md section 8.1), per block and row at a scale with
L computed tokens, K cached keys after writing them, and a text of T tokens:
linear 2*L*(6C^2 + 2*C*F) (qkv, SA proj, CA q, CA proj, fc1, fc2), self-attention 4*L*K*C,
cross-attention 4*L*T*C; plus word embedding and head outside the blocks. The text K/V
projections run once per batch, not per scale, and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_loader.configs import TransformerConfig


def scale_flops(cfg: TransformerConfig, tokens: int, keys: int, text_len: int) -> float:
    """Transformer FLOPs of one row computing ``tokens`` tokens that attend ``keys`` cached keys."""
    c, f = cfg.embed_dim, cfg.ffn_hidden
    per_block = 2 * tokens * (6 * c * c + 2 * c * f) + 4 * tokens * keys * c + 4 * tokens * text_len * c
    outside = 2 * tokens * cfg.token_bits * c + 2 * tokens * c * (2 * c + cfg.num_logits)
    return float(cfg.depth * per_block + outside)


@dataclass
class ScaleStats:
    scale_idx: int
    grid: tuple[int, int]
    tokens_full: int
    """Tokens of the scale (per branch)."""
    tokens_computed: int
    """Tokens the conditional branch computed (the unconditional branch computes the same ones)."""
    uncond_ran: bool
    flops_full: float
    flops_executed: float
    wall_s: float = 0.0
    """Wall time of the whole batch at this scale."""

    @property
    def kept_fraction(self) -> float:
        return self.tokens_computed / self.tokens_full


@dataclass
class SampleStats:
    scales: list[ScaleStats] = field(default_factory=list)
    uncond_stop_scale: int | None = None
    """First scale run without the unconditional branch (None: it ran to the end, or never ran)."""
    cfg_enabled: bool = True

    @property
    def tokens_full(self) -> int:
        branches = 2 if self.cfg_enabled else 1
        return sum(s.tokens_full for s in self.scales) * branches

    @property
    def tokens_computed(self) -> int:
        return sum(s.tokens_computed * (2 if s.uncond_ran else 1) for s in self.scales)

    @property
    def flops_full(self) -> float:
        return sum(s.flops_full for s in self.scales)

    @property
    def flops_executed(self) -> float:
        return sum(s.flops_executed for s in self.scales)

    @property
    def ideal_speedup(self) -> float:
        """Full over executed transformer FLOPs: the speedup if time followed FLOPs."""
        return self.flops_full / self.flops_executed if self.flops_executed else 1.0

    @property
    def kept_fraction_per_scale(self) -> list[float]:
        return [s.kept_fraction for s in self.scales]

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.scales)

    def to_dict(self) -> dict:
        return {
            "tokens_computed": self.tokens_computed,
            "tokens_full": self.tokens_full,
            "uncond_stop_scale": self.uncond_stop_scale,
            "ideal_speedup": round(self.ideal_speedup, 4),
            "flops_full": self.flops_full,
            "flops_executed": self.flops_executed,
            "kept_fraction_per_scale": [round(x, 4) for x in self.kept_fraction_per_scale],
            "scale_wall_s": [round(s.wall_s, 6) for s in self.scales],
        }
