"""Building blocks of the Infinity transformer (inference only).

Operation order and dtypes follow the official implementation (infinity-spec.md sections 3-5
and 10) because bit-exact agreement depends on them: e.g. the SA output is multiplied by
gamma1 in place (rounded to bf16 under autocast) while the FFN output is multiplied out of
place. Module and parameter names equal the official state-dict keys.

Shape letters: N rows (sequences), L tokens of the padded view, T packed tokens, C width,
H heads, Dh head dim, S cached keys, Tt text tokens.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import KVCache, ScaleLayout

# The official constant is torch.log(torch.tensor(100)).item(): log(100) rounded to float32.
MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)).item())


def no_autocast(x: torch.Tensor) -> AbstractContextManager:
    return torch.autocast(device_type=x.device.type, enabled=False)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in float32 (the official fused_ada_layer_norm, eager)."""
    x = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return x.mul(scale.add(1)).add_(shift)


def bf16_attention(q_NHLD: torch.Tensor, k_NHSD: torch.Tensor, v_NHSD: torch.Tensor,
                   mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention on bf16 inputs returning bf16, as flash-attn does.

    On CPU the bf16 values are upcast and attended in float32, then rounded once to bf16
    (running the CPU kernels on bf16 directly is measurably less accurate; reference README 4).
    """
    if q_NHLD.device.type == "cpu":
        with no_autocast(q_NHLD):
            o = F.scaled_dot_product_attention(q_NHLD.float(), k_NHSD.float(), v_NHSD.float(),
                                               attn_mask=mask, scale=scale)
        return o.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q_NHLD, k_NHSD, v_NHSD, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------- RoPE

def rope_tables(head_dim: int, positions_T2: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """cos/sin of the 2-D RoPE angles at integer (row, col) positions: (2, T, Dh/2) float32.

    Angles: the first Dh/4 entries are row * f_m, the next Dh/4 col * f_m, with
    f_m = 1 / base^(2m / (Dh/2)); the product is taken in float32 as the official table.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    pos = positions_T2.to(torch.float32).cpu()
    angles = torch.cat([torch.outer(pos[:, 0], inv_freq), torch.outer(pos[:, 1], inv_freq)], dim=-1)
    return torch.stack([angles.cos(), angles.sin()]).to(positions_T2.device)


def apply_rope(x_NHLD: torch.Tensor, rope_2LD: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2p, 2p+1) by the angles of each token (float32)."""
    cos, sin = rope_2LD[0], rope_2LD[1]
    x = x_NHLD.reshape(*x_NHLD.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.reshape(x_NHLD.shape)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    """text_norm: x * rsqrt(mean(x^2) + eps) * weight in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = x.dtype
        x = x.float()
        return ((x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight).to(src)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Cosine self-attention with a learned per-head scale and 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: SelfAttnContext, layer: int) -> torch.Tensor:
        n, length, dim = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, L, Dh), or (1, H, T, Dh) packed
        scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
        k = F.normalize(k, dim=-1, eps=1e-12)
        with no_autocast(q):
            q, k = apply_rope(q, ctx.rope), apply_rope(k, ctx.rope)
        # SDPA runs in v's dtype (bf16 under autocast; the official autocast casts fp32 q/k to it)
        q, k = q.to(v.dtype), k.to(v.dtype)
        cache = ctx.cache
        with no_autocast(q):
            if cache is not None and cache.mode == "rows":
                o = varlen_attention(q, ctx.layout, lambda r, i: cache.write_row(layer, r, k[i], v[i]), 1.0)
            else:
                k, v, mask = cache.write_read(layer, k, v) if cache is not None else (k, v, ctx.mask)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.proj(o.transpose(1, 2).reshape(n, length, dim))


def varlen_attention(q: torch.Tensor, layout: ScaleLayout, keys_of_row, scale: float,
                     attend=F.scaled_dot_product_attention) -> torch.Tensor:
    """Each row's queries attend that row's keys only, without padding or masks.

    q is laid out like x with heads first ((N, H, L, Dh) rectangle or (1, H, T, Dh) packed);
    ``keys_of_row(r, idx)`` returns the keys and values row r attends, ``idx`` indexing the row's
    tokens (e.g. its KV cache after writing k[idx], v[idx]). This is what a varlen flash kernel
    computes in one launch on GPU.
    """
    outs = []
    for r, idx in enumerate(layout.row_slices()):
        kr, vr = keys_of_row(r, idx)
        if layout.lens[r]:
            outs.append(attend(q[idx], kr, vr, scale=scale))
    return torch.cat(outs, dim=0 if layout.dense else 2)


class CrossAttention(nn.Module):
    """Attention from image tokens (or the pool query) to the text tokens of the same row.

    The official code always attends in bf16 (flash-attn varlen, q and kv cast to bf16).
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        self.for_attn_pool = for_attn_pool
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        if not for_attn_pool:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def project_kv(self, src_NTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text K and V, (N, H, Tt, Dh) each, rounded to bf16 as the attention consumes them."""
        n, t, _ = src_NTC.shape
        kv = F.linear(src_NTC, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(n, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k.to(torch.bfloat16), v.to(torch.bfloat16)

    def forward(self, x: torch.Tensor, layout: ScaleLayout, text: TextKV) -> torch.Tensor:
        q = self.mat_q(x)
        n, length, dim = q.shape
        q = q.view(n, length, self.num_heads, self.head_dim).transpose(1, 2).to(torch.bfloat16)
        if layout.dense:
            o = bf16_attention(q, text.k, text.v, text.mask, self.scale)
        else:  # packed rows: each row's tokens attend its own text, sliced to its length
            o = varlen_attention(q, layout, lambda r, _: (text.k[r:r + 1, :, :text.lens[r]],
                                                          text.v[r:r + 1, :, :text.lens[r]]),
                                 self.scale, attend=lambda qq, kk, vv, scale: bf16_attention(qq, kk, vv, None, scale))
        # .float() then proj: under autocast proj re-rounds to the same bf16 values
        return self.proj(o.transpose(1, 2).reshape(n, length, dim).float())

    def pool(self, text_kv: tuple, text_mask) -> torch.Tensor:
        """Attentive pool: one learned query per head attends each row's text -> (N, D)."""
        k = text_kv[0]
        n = k.shape[0]
        q = self.mat_q.to(torch.bfloat16).unsqueeze(2).expand(n, -1, -1, -1)  # (N, H, 1, Dh)
        o = bf16_attention(q, k, text_kv[1], text_mask, self.scale)
        return self.proj(o.reshape(n, -1).float())


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ca = CrossAttention(dim, text_channels, num_heads, for_attn_pool=True)


class TextKV(NamedTuple):
    """One block's cross-attention memory: K and V (N, H, Tt, Dh) bf16, key mask, text length per row."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    lens: list[int]


class SelfAttnContext:
    """What self-attention needs at one scale besides x: layout, RoPE, cache or mask."""

    def __init__(self, layout: ScaleLayout, rope: torch.Tensor, cache: KVCache | None,
                 mask: torch.Tensor | None = None) -> None:
        self.layout, self.rope, self.cache, self.mask = layout, rope, cache, mask


class LayerNormFP32(nn.LayerNorm):
    """Affine LayerNorm computed in float32 (what CUDA autocast does with bf16 block weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class CrossAttnBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))
        self.sa = SelfAttention(dim, num_heads)
        self.ca = CrossAttention(dim, dim, num_heads)
        self.ffn = FFN(dim, ffn_hidden)
        self.ca_norm = LayerNormFP32(dim, eps=eps)

    def forward(self, x: torch.Tensor, gss: torch.Tensor, sa_ctx: SelfAttnContext, layer: int,
                text: TextKV) -> torch.Tensor:
        """``gss``: the shared AdaLN output per row, (N, 1, 6, C)."""
        with no_autocast(x):
            # per row, then one contiguous tensor per parameter for packed tokens (strided views of a
            # (T, 6, C) sum made every AdaLN op of packed rows slower)
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (
                sa_ctx.layout.per_token(p) for p in (self.ada_gss + gss).unbind(2))
        x = x + self.sa(ada_layer_norm(x, scale1, shift1, self.eps), sa_ctx, layer).mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), sa_ctx.layout, text).float()
        x = x + self.ffn(ada_layer_norm(x, scale2, shift2, self.eps)).mul(gamma2)
        return x


class BlockChunk(nn.Module):
    """The official MultipleLayers wrapper; exists for the ``block_chunks.{c}.module.{j}`` keys."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """cond broadcasts against h: (N, 1, C) per row or (1, T, C) per packed token."""
        scale, shift = self.ada_lin(cond).unflatten(-1, (2, h.shape[-1])).unbind(-2)
        return ada_layer_norm(h, scale, shift, self.eps)
