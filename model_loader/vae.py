"""BSQ VAE: conv encoder/decoder, bits <-> codes, and the multi-scale residual quantizer.

Key names follow the official checkpoints (every conv wrapped as ``.conv``, every GroupNorm as
``.norm``; the quantizer registered twice, as ``quantizer`` and ``quantize``). Spec: section 7
of infinity-spec.md. Interpolations: codes are resampled bilinearly (align_corners=False),
which equals the official trilinear call with a time axis of 1; the encoder-side residual
is downsampled with 'area'.

Shape letters: B images, D code bits, h/w latent grid, H/W pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import VAEConfig


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, channels: int, groups: int | None = None) -> None:
        super().__init__()
        if groups is None:  # the official rule
            groups = 32 if channels % 32 == 0 else 24
        if channels % groups:
            raise ValueError(f"GroupNorm with {groups} groups needs channels divisible by it, got {channels}")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 as under CUDA autocast (group_norm is an fp32 op there); CPU autocast would not cast
        n = self.norm
        return F.group_norm(x.float(), n.num_groups, n.weight.float(), n.bias.float(), n.eps)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int | None = None) -> None:
        super().__init__()
        self.norm1 = Normalize(cin, groups)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout, groups)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int | None) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # cnn_attention='no': always empty, kept for the key layout
        if resample is not None:
            self.add_module(name, resample)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.base_ch, cfg.encoder_ch_mult
        n_down = cfg.patch_size.bit_length() - 1
        self.conv_in = Conv(3, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        levels = []
        for i, m in enumerate(mult):
            cin, cout = ch * in_mult[i], ch * m
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, cfg.norm_groups) for j in range(cfg.num_res_blocks)]
            levels.append(_Level(blocks, Downsample(cout) if i < n_down else None, "downsample"))
        self.down = nn.ModuleList(levels)
        c_last = ch * mult[-1]
        self.mid = _Mid(c_last, cfg.norm_groups)
        self.norm_out = Normalize(c_last, cfg.norm_groups)
        self.conv_out = Conv(c_last, cfg.codebook_bits, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.base_ch, cfg.decoder_ch_mult
        n_up = cfg.patch_size.bit_length() - 1
        block_in = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_bits, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            cout = ch * mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else cout, cout, cfg.norm_groups)
                      for j in range(cfg.num_res_blocks + 1)]
            block_in = cout
            levels.insert(0, _Level(blocks, Upsample(cout) if 1 <= i <= n_up else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = Conv(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, abort: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """``abort()``, asked between blocks: True stops the decode there (returns None)."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                if abort is not None and abort():
                    return None
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if abort is not None and abort():
            return None
        return self.conv_out(swish(self.norm_out(h)))


class _BSQ(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        # int64 powers of two, most significant first (only used by integer labels; kept for the keys)
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1))


class _MultiScaleBSQ(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.lfq = _BSQ(bits)


class BSQVAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = _MultiScaleBSQ(cfg.codebook_bits)
        self.quantize = self.quantizer  # the official module registers the quantizer twice

    @property
    def bits(self) -> int:
        return self.cfg.codebook_bits

    def decode(self, codes_BDhw: torch.Tensor) -> torch.Tensor:
        """Summed codes -> image in [-1, 1], (B, 3, H, W).

        Images are decoded one at a time so an image never depends on what it was batched
        with (convolution kernels may sum in a batch-dependent order); a 1024-px decode alone
        is large enough to fill a GPU.
        """
        return torch.cat([self.decoder(codes_BDhw[i:i + 1]) for i in range(codes_BDhw.shape[0])]).clamp(-1, 1)

    def decode_one(self, codes_1Dhw: torch.Tensor, abort: Callable[[], bool]) -> torch.Tensor | None:
        """One image as ``decode`` makes it, (1, 3, H, W), or None if ``abort()`` (asked between the
        decoder's blocks) said stop: a canceled image stops mid-decode (on a CPU a 1024-px decode
        of the tiny test models takes seconds)."""
        img = self.decoder(codes_1Dhw, abort)
        return None if img is None else img.clamp(-1, 1)

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> continuous latent (B, D, h, w) float32."""
        return self.encoder(img_B3HW).float()

    def quantize_multiscale(self, z_BDhw: torch.Tensor, grids: list[tuple[int, int]]):
        """Multi-scale residual BSQ of a latent; returns (f_hat_BDhw, bits per scale (B, h, w, D) uint8).

        Each scale: area-downsample the residual, L2-normalise per position, take signs
        (0 -> negative), upsample the +-1/sqrt(D) code bilinearly and subtract it.
        """
        with torch.autocast(device_type=z_BDhw.device.type, enabled=False):
            residual = z_BDhw.float()
            f_hat = torch.zeros_like(residual)
            full = tuple(residual.shape[-2:])
            all_bits = []
            for grid in grids:
                r = residual if tuple(grid) == full else F.interpolate(residual, size=tuple(grid), mode="area")
                u = F.normalize(r.permute(0, 2, 3, 1), dim=-1)
                sign = torch.where(u > 0, 1.0, -1.0).to(u.dtype) * (1.0 / self.bits ** 0.5)
                q = u + (sign - u)  # the official straight-through form, evaluated forward
                all_bits.append((q > 0).to(torch.uint8))
                q = q.permute(0, 3, 1, 2)
                if tuple(grid) != full:
                    q = resize_codes(q, full)
                residual = residual - q
                f_hat = f_hat + q
        return f_hat, all_bits


def build_vae(cfg: VAEConfig, device: torch.device | str = "meta") -> BSQVAE:
    with torch.device(device):
        return BSQVAE(cfg)


# ----------------------------------------------------------------------------- bits and codes

def bits_to_codes(bits_BhwD: torch.Tensor) -> torch.Tensor:
    """Bit labels (B, h, w, D) in {0, 1} -> codes (B, D, h, w): +-1/sqrt(D), L2-normalised per position."""
    d = bits_BhwD.shape[-1]
    s = 1.0 / d ** 0.5
    codes = bits_BhwD.to(torch.float32) * s * 2 - s
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)


def resize_codes(codes_BDhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling, align_corners=False, no antialias (up and down), as the official trilinear."""
    return F.interpolate(codes_BDhw, size=tuple(size), mode="bilinear", align_corners=False)


def tokens_to_vae_bits(bits_BLd: torch.Tensor, grid: tuple[int, int], patchify: bool) -> torch.Tensor:
    """Transformer bit tokens (B, h*w, d_t) -> VAE bit map (B, h', w', D).

    With 2x2 patchify token channel 4c + 2i + j holds VAE bit c of pixel (2y+i, 2x+j).
    """
    b = bits_BLd.shape[0]
    x = bits_BLd.reshape(b, grid[0], grid[1], -1)
    if not patchify:
        return x
    return F.pixel_shuffle(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def vae_bits_to_tokens(bits_BhwD: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Inverse of ``tokens_to_vae_bits``: (B, h', w', D) -> (B, h*w, d_t)."""
    x = bits_BhwD.permute(0, 3, 1, 2)
    if patchify:
        x = F.pixel_unshuffle(x, 2)
    return x.flatten(2).transpose(1, 2)


def codes_to_tokens(codes_BDhw: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Code map at a scale's VAE grid -> transformer input features (B, h*w, d_t)."""
    if patchify:
        codes_BDhw = F.pixel_unshuffle(codes_BDhw, 2)
    return codes_BDhw.flatten(2).transpose(1, 2)


def image_to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image -> uint8 (B, H, W, 3) RGB, by truncation as the official conversion.

    The official function returns BGR (it writes with OpenCV); we return RGB.
    """
    return ((img_B3HW + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)
