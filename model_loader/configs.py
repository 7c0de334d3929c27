"""Frozen model configurations and named presets (one per servable model).

The official code selects models with if/elif chains on strings; here every model is a
frozen ``ModelPreset`` looked up by name with ``get_preset``. Sizes and inference defaults
come from infinity-spec.md sections 1.1-1.3 and the reference README.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

CheckpointLayout = Literal["torch", "torch_shard", "safetensors"]


@dataclass(frozen=True)
class VAEConfig:
    """BSQ VAE (flux-style conv autoencoder with a multi-scale binary spherical quantizer)."""

    codebook_bits: int
    """d: bits per latent position (32 for the 2B VAE, 14 for the 8B patchify VAE)."""
    patch_size: int
    """Pixels per latent position side (16 or 8); the number of x2 resamplings is log2 of it."""
    encoder_ch_mult: tuple[int, ...]
    decoder_ch_mult: tuple[int, ...]
    base_ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int | None = None
    """GroupNorm groups; None is the official rule (32, or 24 where 32 does not divide). Not stored in
    checkpoints. Narrow models need fewer: with one channel per group the norm erases each channel's
    image mean, and a 32-channel decoder then cannot reproduce flat colours."""

    def __post_init__(self) -> None:
        if self.codebook_bits <= 0:
            raise ValueError(f"codebook_bits must be positive, got {self.codebook_bits}")
        if self.patch_size not in (4, 8, 16):
            raise ValueError(f"patch_size must be 4, 8 or 16, got {self.patch_size}")
        n_up = self.patch_size.bit_length() - 1
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            if len(getattr(self, name)) <= n_up:
                raise ValueError(f"{name} needs more than log2(patch_size)={n_up} levels")


@dataclass(frozen=True)
class TransformerConfig:
    """Infinity transformer: the constructor arguments that vary between released models."""

    depth: int
    embed_dim: int
    num_heads: int
    block_chunks: int
    token_bits: int
    """d_t: bits per transformer token (d, or 4d with 2x2 spatial patchify)."""
    text_channels: int = 2048
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_levels: int = 15
    """Rows of the level (scale) embedding table."""

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        if self.text_channels % self.pool_head_dim_for_text:
            raise ValueError("text_channels must be divisible by the text-pool head width (128, or 64 above C=4096)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # Python's round (half to even) as in the official code: 2080*4/256 = 32.5 -> 32
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def num_logits(self) -> int:
        """V: two logits (bit value 0 and 1) per token bit."""
        return 2 * self.token_bits

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def pool_head_dim_for_text(self) -> int:
        return 64 if self.embed_dim > 4096 else 128

    @property
    def pool_num_heads(self) -> int:
        """Heads of the attentive text pool: text_channels // 128 (// 64 for very wide models)."""
        return self.text_channels // self.pool_head_dim_for_text


@dataclass(frozen=True)
class SamplingDefaults:
    cfg: float
    tau: float
    top_k: int = 900
    top_p: float = 0.97


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build, load and run one servable model."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    spatial_patchify: bool
    pn: str
    """Default resolution key: "1M" (1024 px), "0.25M" (512 px), "0.06M" (256 px)."""
    sampling: SamplingDefaults
    checkpoint_layout: CheckpointLayout = "torch"
    default_files: dict[str, str] = field(default_factory=dict)
    """File names a user is expected to bring, relative to the weights folder."""
    text_encoder: str = "flan-t5-xl"
    description: str = ""
    pns: tuple[str, ...] = ()
    """Resolution keys the model serves, ``pn`` among them; empty: only ``pn`` (see ``served_pns``)."""
    default_pruning: str = "balanced"
    """The pruning preset a server of this model applies when neither the request nor
    ``LDSERVE_DEFAULT_PRUNING`` names one (a name of ``pruning.config.PRESETS``)."""

    def __post_init__(self) -> None:
        if self.pns and self.pn not in self.pns:
            raise ValueError(f"preset {self.name}: default pn {self.pn!r} is not among its pns {self.pns}")
        expected = self.vae.codebook_bits * (4 if self.spatial_patchify else 1)
        if self.transformer.token_bits != expected:
            raise ValueError(
                f"preset {self.name}: transformer token_bits {self.transformer.token_bits} does not match "
                f"VAE bits {self.vae.codebook_bits} x {4 if self.spatial_patchify else 1}"
            )

    @property
    def vae_scale(self) -> int:
        """Latent positions per token side (2 with spatial patchify)."""
        return 2 if self.spatial_patchify else 1

    @property
    def served_pns(self) -> tuple[str, ...]:
        return self.pns or (self.pn,)

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per token side: 16 for every official model (the 8B's 8-px VAE with 2x2 patchify)."""
        return self.vae.patch_size * self.vae_scale


VAE_D32 = VAEConfig(codebook_bits=32, patch_size=16, encoder_ch_mult=(1, 2, 4, 4, 4),
                    decoder_ch_mult=(1, 2, 4, 4, 4))
VAE_D14_PATCHIFY = VAEConfig(codebook_bits=14, patch_size=8, encoder_ch_mult=(1, 2, 4, 4),
                             decoder_ch_mult=(1, 2, 4, 4))

INFINITY_2B = TransformerConfig(depth=32, embed_dim=2048, num_heads=16, block_chunks=8, token_bits=32)
INFINITY_8B = TransformerConfig(depth=40, embed_dim=3584, num_heads=28, block_chunks=8, token_bits=56)

# Tiny structural mirrors of 2B and 8B (the shapes of ../shared/reference/tiny2b and tiny8b).
TINY_2B = TransformerConfig(depth=4, embed_dim=64, num_heads=2, block_chunks=2, token_bits=32,
                            text_channels=256)
TINY_8B = TransformerConfig(depth=4, embed_dim=64, num_heads=4, block_chunks=2, token_bits=56,
                            text_channels=256)
TINY_VAE_D32 = VAEConfig(codebook_bits=32, patch_size=16, encoder_ch_mult=(1, 1, 1, 1, 1),
                         decoder_ch_mult=(1, 1, 1, 2, 1), base_ch=32)
TINY_VAE_D14 = VAEConfig(codebook_bits=14, patch_size=8, encoder_ch_mult=(1, 1, 1, 1),
                         decoder_ch_mult=(1, 1, 2, 1), base_ch=32)

# The demo model (demo/): trained on procedural shapes, shipped as bf16 safetensors, the CPU default.
DEMO_VAE = VAEConfig(codebook_bits=16, patch_size=8, encoder_ch_mult=(1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1),
                     base_ch=32, num_res_blocks=0, norm_groups=8)
DEMO_TRANSFORMER = TransformerConfig(depth=6, embed_dim=256, num_heads=4, block_chunks=2, token_bits=16,
                                     text_channels=256, text_maxlen=64)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="infinity-2b", transformer=INFINITY_2B, vae=VAE_D32, spatial_patchify=False, pn="1M",
            sampling=SamplingDefaults(cfg=3.0, tau=0.5), checkpoint_layout="torch",
            default_files={"transformer": "infinity_2b_reg.pth", "vae": "infinity_vae_d32reg.pth",
                           "text_encoder": "flan-t5-xl"},
            description="Infinity-2B at 1024x1024 (13 scales), VAE d32", pns=("0.25M", "1M"),
        ),
        ModelPreset(
            name="infinity-8b", transformer=INFINITY_8B, vae=VAE_D14_PATCHIFY, spatial_patchify=True, pn="1M",
            sampling=SamplingDefaults(cfg=3.0, tau=1.0), checkpoint_layout="torch_shard",
            default_files={"transformer": "infinity_8b_weights", "vae": "infinity_vae_d56_f8_14_patchify.pth",
                           "text_encoder": "flan-t5-xl-official"},
            description="Infinity-8B at 1024x1024 (13 scales), VAE d14 with 2x2 spatial patchify",
            pns=("0.25M", "1M"),
        ),
        ModelPreset(
            name="infinity-8b-512", transformer=INFINITY_8B, vae=VAE_D14_PATCHIFY, spatial_patchify=True,
            pn="0.25M", sampling=SamplingDefaults(cfg=3.0, tau=1.0), checkpoint_layout="torch_shard",
            default_files={"transformer": "infinity_8b_512x512_weights",
                           "vae": "infinity_vae_d56_f8_14_patchify.pth", "text_encoder": "flan-t5-xl-official"},
            description="Infinity-8B at 512x512 (10 scales)",
        ),
        ModelPreset(
            name="demo", transformer=DEMO_TRANSFORMER, vae=DEMO_VAE, spatial_patchify=False, pn="0.06M",
            sampling=SamplingDefaults(cfg=3.0, tau=1.0), checkpoint_layout="safetensors",
            default_files={"transformer": "transformer.safetensors", "vae": "vae.safetensors",
                           "text_encoder": "text_encoder"},
            text_encoder="tiny-t5",
            description="Demo Infinity trained on procedural shapes (128 px, 7 scales, VAE d16 f8); CPU default",
            # its 12x12 and 16x16 scales (balanced's LHEP set here) shape the figures: LHEP on both drops
            # outlines (stage 16, 128 held-out images: balanced 24.7 dB, adherence -0.21; light 30.3 dB,
            # -0.05; model card)
            default_pruning="light",
        ),
        ModelPreset(
            name="tiny-2b", transformer=TINY_2B, vae=TINY_VAE_D32, spatial_patchify=False, pn="0.06M",
            sampling=SamplingDefaults(cfg=3.0, tau=0.5), checkpoint_layout="safetensors",
            text_encoder="tiny-t5", description="2B-structured test model (256 px, 7 scales)",
            pns=("0.06M", "0.25M", "1M"),
        ),
        ModelPreset(
            name="tiny-8b", transformer=TINY_8B, vae=TINY_VAE_D14, spatial_patchify=True, pn="0.06M",
            sampling=SamplingDefaults(cfg=3.0, tau=1.0), checkpoint_layout="safetensors",
            text_encoder="tiny-t5", description="8B-structured test model with patchify (256 px, 7 scales)",
            pns=("0.06M", "0.25M", "1M"),
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name; unknown names raise ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Add a preset (benchmark or demo models defined elsewhere)."""
    PRESETS[preset.name] = preset
    return preset


def with_overrides(preset: ModelPreset, **changes) -> ModelPreset:
    return replace(preset, **changes)
