"""Baseline generation: text -> scales -> bits -> codes -> VAE decode -> RGB images, full CFG.

This is the unpruned reference the pruning engine (pruning.loop) generalises and must
reproduce bit for bit. Rows: B conditional rows, then one unconditional row per sample
whose cfg != 1 (its text: the learned cfg_uncond rows, or its negative prompt).

Images are returned as RGB uint8 (B, H, W, 3); the official code returns BGR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache, ScaleLayout
from .layers import rope_tables
from .model import InfinityModel
from .sampling import SamplingParams, guidance_weights, make_generators, sample_bits_
from .schedules import rope_positions, scale_offsets
from .text_cond import TextCond
from .transformer import InfinityTransformer, TextState
from .vae import bits_to_codes, codes_to_tokens, image_to_uint8, resize_codes, tokens_to_vae_bits


@dataclass
class GenerationOutput:
    images_BHW3: torch.Tensor
    """uint8 RGB."""
    images_float_B3HW: torch.Tensor
    """Decoder output clamped to [-1, 1]."""
    summed_codes_BDhw: torch.Tensor
    bits_per_scale: list[torch.Tensor] = field(default_factory=list)
    """Per scale, the sampled bits in token layout (B, L, d_t) uint8."""
    guided_logits_per_scale: list[torch.Tensor] = field(default_factory=list)
    """Per scale, the guided logits (B, L, d_t, 2) (only with record=True)."""
    hidden_per_scale: list[torch.Tensor] = field(default_factory=list)
    """Per scale, the last block's output for all rows (N, L, C) (only with record=True)."""


def build_text_rows(model: InfinityModel, text: TextCond, params: list[SamplingParams],
                    negative: TextCond | None) -> tuple[TextCond, list[int]]:
    """Conditional rows then the unconditional rows; returns the text and the samples with an uncond row."""
    uncond_of = [b for b, p in enumerate(params) if p.uses_uncond]
    if not uncond_of:
        return text, uncond_of
    uncond = negative if negative is not None else model.transformer.uncond_text(text.lens_B.cpu())
    return TextCond.cat([text, uncond.to(text.features_BTC.device).select(uncond_of)]), uncond_of


def new_kv_cache(tf: InfinityTransformer, n_rows: int, capacity: int, dtype: torch.dtype) -> KVCache:
    cfg = tf.cfg
    return KVCache(depth=cfg.depth, n_rows=n_rows, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                   capacity=capacity, dtype=dtype, device=tf.pos_start.device)


def guide(logits_NLV: torch.Tensor, batch: int, uncond_of: list[int], weights) -> torch.Tensor:
    """1/tau, then cfg * cond + (1 - cfg) * uncond for the samples that have an uncond row."""
    inv_tau, w_cond, w_uncond = weights
    rows_tau = torch.cat([inv_tau, inv_tau[uncond_of]]) if uncond_of else inv_tau
    logits = logits_NLV.mul(rows_tau)
    guided = logits[:batch].clone()
    if uncond_of:
        idx = torch.tensor(uncond_of, device=logits.device)
        guided[idx] = w_cond[idx] * logits[idx] + w_uncond[idx] * logits[batch:]
    return guided


def next_scale_input(summed_BDhw: torch.Tensor, grid: tuple[int, int], vae_scale: int,
                     patchify: bool) -> torch.Tensor:
    """The accumulated codes resized to the next scale's grid, as transformer features (B, L, d_t)."""
    nxt = resize_codes(summed_BDhw, (grid[0] * vae_scale, grid[1] * vae_scale))
    return codes_to_tokens(nxt, patchify)


@torch.inference_mode()
def generate(model: InfinityModel, text: TextCond, grids: tuple[tuple[int, int], ...],
             params: list[SamplingParams], *, negative: TextCond | None = None,
             teacher_bits: list[torch.Tensor] | None = None, record: bool = False) -> GenerationOutput:
    """Generate B images at one scale schedule with full classifier-free guidance.

    ``teacher_bits`` (per scale, (B, L, d_t)) replaces the sampled bits (teacher forcing).
    """
    tf, preset, dev = model.transformer, model.preset, model.device
    b, patchify, vs = text.batch_size, preset.spatial_patchify, preset.vae_scale
    if len(params) != b:
        raise ValueError(f"params has {len(params)} entries for {b} prompts")
    final_grid = (grids[-1][0] * vs, grids[-1][1] * vs)
    offsets = scale_offsets(grids)
    rope_all = rope_tables(tf.cfg.head_dim, rope_positions(tuple(grids)).to(dev))
    weights, gens = guidance_weights(params, dev), make_generators(params, dev)
    out = GenerationOutput(torch.empty(0), torch.empty(0), torch.empty(0))
    with model.autocast():
        # 1. text: pooled condition, AdaLN source and cross-attention K/V for every row
        rows_text, uncond_of = build_text_rows(model, text.to(dev), params, negative)
        state: TextState = tf.prepare_text(rows_text)
        n = b + len(uncond_of)
        row_src = list(range(b)) + uncond_of  # which sample's image tokens each row carries
        cache = new_kv_cache(tf, n, offsets[-1], model.compute_dtype)
        x = tf.start_tokens(state.sos_ND)
        summed = torch.zeros(b, preset.vae.codebook_bits, *final_grid, device=dev)
        for si, grid in enumerate(grids):
            # 2. transformer on every token of every row
            length = grid[0] * grid[1]
            layout = ScaleLayout.dense_layout(n, length)
            hidden = tf.forward_scale(x, si, state, layout, rope_all[:, offsets[si]:offsets[si + 1]], cache)
            logits = tf.logits(hidden, state.sos_ND.unsqueeze(1))
            # 3. guidance and sampling (or the teacher's bits)
            guided = guide(logits, b, uncond_of, weights).view(b, length, -1, 2)
            if teacher_bits is not None:
                bits = teacher_bits[si].to(dev).long()
            else:
                bits = torch.stack([sample_bits_(guided[i].clone(), params[i].top_k, params[i].top_p, gens[i])
                                    for i in range(b)])
            if record:
                out.guided_logits_per_scale.append(guided.float().cpu())
                out.hidden_per_scale.append(hidden.float().cpu())
            out.bits_per_scale.append(bits.to(torch.uint8).cpu())
            # 4. bits -> codes, accumulate at the final latent grid, build the next input
            codes = bits_to_codes(tokens_to_vae_bits(bits, grid, patchify))
            if si == len(grids) - 1:
                summed += codes
                break
            summed += resize_codes(codes, final_grid)
            feats = next_scale_input(summed, grids[si + 1], vs, patchify)
            x = tf.embed_tokens(feats)[row_src]
        # 5. decode
        img = model.vae.decode(summed)
        out.images_BHW3 = image_to_uint8(img).cpu()
    out.images_float_B3HW = img.float().cpu()
    out.summed_codes_BDhw = summed.cpu()
    return out
