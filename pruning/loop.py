"""The generation loop with per-sample pruning policies, batched.

Generalises model_loader.generate (the unpruned baseline; ``NoPruning`` reproduces it bit for
bit). Per scale: every sample's policy plans which tokens to compute and whether its
unconditional row still runs; stopped rows leave the batch (KV cache and text state are
compacted once); rows with equal token counts run as a rectangle (N, K, C), unequal ones
packed (1, T, C) so linear layers see no padding; only computed tokens enter the KV cache,
at their true RoPE positions; sampled bits of kept tokens are scattered over the fill (the
previous residual, nearest-upsampled) and accumulated as in the baseline.

Shape letters: B samples, N rows, L tokens of the scale, K kept tokens, d bits per token,
D VAE code bits, h/w grids.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model_loader.generate import build_text_rows, new_kv_cache, next_scale_input
from model_loader.kv_cache import ScaleLayout
from model_loader.layers import rope_tables
from model_loader.model import InfinityModel
from model_loader.sampling import SamplingParams, guidance_weights, make_generators, sample_bits_, sample_kept_bits_
from model_loader.schedules import image_size, rope_positions, scale_offsets
from model_loader.text_cond import TextCond
from model_loader.transformer import head_cond
from model_loader.vae import bits_to_codes, image_to_uint8, resize_codes, tokens_to_vae_bits, vae_bits_to_tokens

from .cuda_graphs import ScaleGraphs
from .policy import PruningPolicy, ScaleContext, ScaleObservation, ScalePlan
from .stats import SampleStats, ScaleStats, scale_flops

ScaleCallback = Callable[[int, Callable[[list[int]], torch.Tensor]], None]
"""``on_scale(scale_index, preview)``: see ``generate``."""


@dataclass
class LoopOutput:
    images_BHW3: torch.Tensor
    stats: list[SampleStats]
    summed_codes_BDhw: torch.Tensor
    bits_per_scale: list[torch.Tensor] = field(default_factory=list)
    """Per scale (B, L, d) uint8: sampled bits where computed, fill bits elsewhere (the previous
    residual's; with ``fill_mode`` zero those tokens' codes are zero and their bits are not used)."""
    stopped: set[int] = field(default_factory=set)
    """Samples ``stopped()`` named: not finished, not decoded."""


@dataclass
class _Rows:
    """Which sample each row carries: the conditional rows of the samples still running, then
    the uncond rows still running."""

    batch: int
    cond_of: list[int]
    uncond_of: list[int]

    @property
    def src(self) -> list[int]:
        return self.cond_of + self.uncond_of

    def cond_row(self, b: int) -> int | None:
        return self.cond_of.index(b) if b in self.cond_of else None

    def uncond_row(self, b: int) -> int | None:
        return len(self.cond_of) + self.uncond_of.index(b) if b in self.uncond_of else None


class _ScaleClock:
    """Wall time of each scale without a host sync per scale: CUDA events on a GPU (read once at
    the end), the host clock on CPU (where every op has finished when it returns)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def restart(self) -> None:
        """Move the last mark to now: time spent since (a caller's preview) counts in no scale."""
        self.marks.pop()
        self.mark()

    def walls(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def _embed_rows(model: InfinityModel, feats_BLd: torch.Tensor, rows: _Rows, keep: list[torch.Tensor | None],
                rope_2LD: torch.Tensor, padded: bool) -> tuple[torch.Tensor, ScaleLayout, torch.Tensor]:
    """Embedded inputs and RoPE of the kept tokens of every row: a rectangle (N, Lmax, C) when
    row lengths are equal (or ``padded``: shorter rows padded, pad tokens computed and masked
    out of the cache), else packed (1, T, C)."""
    b, length, _ = feats_BLd.shape
    dev = feats_BLd.device
    idx = [keep[s] if keep[s] is not None else torch.arange(length, device=dev) for s in rows.src]
    lens = [int(i.numel()) for i in idx]
    layout = ScaleLayout.from_lens(lens, dev)
    if padded and not layout.dense:
        layout = ScaleLayout(n_rows=len(lens), lens=lens, dense=True)
        idx = [torch.cat([i.to(dev), i.new_zeros(layout.max_len - i.numel()).to(dev)]) for i in idx]
    if layout.total == 0:
        return feats_BLd[:0], layout, rope_2LD
    if all(keep[s] is None for s in rows.src):  # every token of every row: exactly the baseline's ops
        return model.transformer.embed_tokens(feats_BLd)[rows.src], layout, rope_2LD
    flat = torch.cat([s * length + i.to(dev) for s, i in zip(rows.src, idx, strict=True)])
    x = feats_BLd.reshape(b * length, -1)[flat]  # padded rows repeat token 0: computed, never stored
    x = x.view(layout.n_rows, layout.max_len, -1) if layout.dense else x.unsqueeze(0)
    if layout.dense:  # rows' own token positions: (2, N, 1, Lmax, Dh/2)
        rope = rope_2LD[:, torch.stack([i.to(dev) for i in idx])].unsqueeze(2)
    else:  # per packed token: (2, T, Dh/2)
        rope = rope_2LD[:, torch.cat([i.to(dev) for i in idx])]
    return model.transformer.embed_tokens(x), layout, rope


def _fill_bits(prev_bits_hwD: torch.Tensor | None, grid_vae: tuple[int, int], bits: int,
               device: torch.device) -> torch.Tensor:
    """The previous residual's bits nearest-upsampled to this scale's VAE grid (h', w', D)."""
    if prev_bits_hwD is None:
        return torch.zeros(*grid_vae, bits, dtype=torch.uint8, device=device)
    up = F.interpolate(prev_bits_hwD.permute(2, 0, 1)[None].float(), size=grid_vae, mode="nearest")
    return up[0].permute(1, 2, 0).to(torch.uint8)


@torch.inference_mode()
def generate(model: InfinityModel, text: TextCond, grids: tuple[tuple[int, int], ...],
             params: list[SamplingParams], policies: list[PruningPolicy], *,
             negative: TextCond | None = None, padded: bool = False,
             graphs: ScaleGraphs | None = None, on_scale: ScaleCallback | None = None,
             stopped: Callable[[], Collection[int]] | None = None) -> LoopOutput:
    """Generate B images at one schedule; sample b uses ``params[b]`` and ``policies[b]``.

    ``padded`` runs rows of unequal token counts as a padded rectangle instead of packed
    (for measuring the two; packed is the default because linear layers then skip the padding).
    ``graphs`` (a ``ScaleGraphs`` of this model) replays captured CUDA graphs for the scales
    where every row computes the same tokens; the results equal the eager loop's.
    ``on_scale(si, preview)`` is called after every scale (after the last, before the final decode);
    ``preview(samples)`` decodes those samples' codes summed so far, uint8 (len(samples), H, W, 3) on
    the CPU (progress events and partial images; its time counts in no scale's wall time; the images
    are unchanged by it). An exception it raises ends the generation there.
    ``stopped()``: asked before every scale and during the final decode (before each image and
    between the decoder's blocks), the samples nobody waits for any more (their requests were
    canceled): their rows leave the batch (as stopped uncond rows do), so the others run as if they
    had been alone, and they are not decoded further (their images are zero, their statistics end
    where they stopped).
    """
    tf, preset, dev = model.transformer, model.preset, model.device
    b, patchify, vs, nbits = text.batch_size, preset.spatial_patchify, preset.vae_scale, preset.vae.codebook_bits
    if not len(params) == len(policies) == b:
        raise ValueError(f"{b} prompts need as many sampling params and policies")
    final_grid = (grids[-1][0] * vs, grids[-1][1] * vs)
    offsets = scale_offsets(grids)
    rope_all = rope_tables(tf.cfg.head_dim, rope_positions(tuple(grids)).to(dev))
    weights, gens = guidance_weights(params, dev), make_generators(params, dev)
    for p in policies:
        p.reset(tuple(grids))
    stats = [SampleStats(cfg_enabled=p.uses_uncond) for p in params]
    out_bits: list[torch.Tensor] = []
    with model.autocast():
        # 1. text state for all rows; caches sized for the full schedule
        rows_text, uncond_of = build_text_rows(model, text.to(dev), params, negative)
        state = tf.prepare_text(rows_text)
        lens = rows_text.lens_B.tolist()
        # each sample's text tokens: its conditional row's, its unconditional row's (the negative
        # prompt, or the empty prompt's), for the FLOP counts
        text_len_B = [(lens[s], lens[b + uncond_of.index(s)] if s in uncond_of else 0) for s in range(b)]
        rows = _Rows(b, list(range(b)), uncond_of)
        cache = (new_kv_cache(tf, len(rows.src), offsets[-1], model.compute_dtype) if graphs is None
                 else graphs.kv_cache(len(rows.src), offsets[-1], model.compute_dtype))
        keys_done = [0] * b  # tokens each sample has in its cache rows
        summed = torch.zeros(b, nbits, *final_grid, device=dev)
        history: list[list[torch.Tensor]] = [[] for _ in range(b)]  # residual code maps per scale
        hist_bits: list[torch.Tensor | None] = [None] * b
        feats = None
        clock = _ScaleClock(dev)
        records = []
        dropped: set[int] = set()
        for si, grid in enumerate(grids):
            # 2. plans; rows of stopped samples and stopped uncond rows leave the batch
            dropped |= set(stopped()) if stopped is not None else set()
            ctxs = [ScaleContext(si, tuple(grids), history[s][-1] if history[s] else None,
                                 None if feats is None else feats[s]) for s in range(b)]
            plans = [_DROPPED if s in dropped else policies[s].plan(ctxs[s]) for s in range(b)]
            still = [s for s in rows.uncond_of if plans[s].run_uncond]
            live = [s for s in rows.cond_of if s not in dropped]
            if not live:  # every sample stopped
                break
            if still != rows.uncond_of or live != rows.cond_of:
                keep_rows = [rows.cond_row(s) for s in live] + [rows.uncond_row(s) for s in still]
                cache.select_rows(keep_rows)
                state = state.select_rows(keep_rows)
                for s in set(rows.uncond_of) - set(still) - dropped:
                    stats[s].uncond_stop_scale = si
                rows = _Rows(b, live, still)
            keep = [p.keep_idx_K for p in plans]
            # 3. transformer on the kept tokens of every running row
            logits_NLV = _forward(model, state, rows, keep, feats, si, rope_all[:, offsets[si]:offsets[si + 1]],
                                  cache, padded, graphs)
            # 4. per sample: guidance, observation, sampling, scatter over the fill
            codes, bits_all = _sample_scale(model, si, grid, rows, plans, logits_NLV, weights, gens, params,
                                            policies, ctxs, history, hist_bits)
            out_bits.append(bits_all)
            clock.mark()
            records.append((si, grid, keep, rows))
            # 5. accumulate and build the next scale's input
            last = si == len(grids) - 1
            summed += codes if last else resize_codes(codes, final_grid)
            if not last:
                feats = next_scale_input(summed, grids[si + 1], vs, patchify)
            if on_scale is not None:
                on_scale(si, functools.partial(_preview, model, summed))
                clock.restart()
        walls = clock.walls()
        for (si, grid, keep, rows_si), wall in zip(records, walls, strict=True):
            _record(stats, tf.cfg, si, grid, keep, rows_si, params, keys_done, offsets[si + 1], text_len_B, wall)
        dropped |= set(stopped()) if stopped is not None else set()
        if stopped is None:
            images = image_to_uint8(model.vae.decode(summed)).cpu()
        else:
            images = _decode_unless_stopped(model, summed, dropped, stopped, image_size(tuple(grids),
                                                                                       preset.pixels_per_token))
    return LoopOutput(images, stats, summed.float().cpu(), [b.cpu() for b in out_bits], dropped)


def _decode_unless_stopped(model: InfinityModel, summed_BDhw: torch.Tensor, dropped: set[int],
                           stopped: Callable[[], Collection[int]], size_HW: tuple[int, int]) -> torch.Tensor:
    """The final decode, image by image (as ``BSQVAE.decode``), asking ``stopped()`` before each image
    and between the decoder's blocks: a sample stopped meanwhile is not decoded further. Samples
    stopped by the end join ``dropped`` (all of a canceled request's, also those decoded before
    its cancel) and are zeros. uint8 (B, H, W, 3) on the CPU."""
    images = torch.zeros(summed_BDhw.shape[0], *size_HW, 3, dtype=torch.uint8)
    for s in range(summed_BDhw.shape[0]):
        if s in dropped:
            continue
        img = model.vae.decode_one(summed_BDhw[s:s + 1], lambda s=s: s in set(stopped()))
        if img is not None:
            images[s] = image_to_uint8(img)[0].cpu()
    dropped |= set(stopped())
    images[sorted(dropped)] = 0
    return images


_DROPPED = ScalePlan(keep_idx_K=None, run_uncond=False)
"""The plan of a stopped sample (its rows left the batch; nothing of it is computed)."""


def _preview(model: InfinityModel, summed_BDhw: torch.Tensor, samples: list[int]) -> torch.Tensor:
    """The samples' codes summed so far, decoded: uint8 (len(samples), H, W, 3) on the CPU."""
    return image_to_uint8(model.vae.decode(summed_BDhw[samples])).cpu()


def _record(stats: list[SampleStats], cfg, si: int, grid: tuple[int, int], keep, rows: _Rows,
            params: list[SamplingParams], keys_done: list[int], keys_full: int, text_len: list[tuple[int, int]],
            wall: float) -> None:
    """Append this scale's ScaleStats to every sample (FLOPs with the real KV and text lengths of
    each branch: the unconditional one reads the negative prompt, or the empty prompt)."""
    length = grid[0] * grid[1]
    for s, st in enumerate(stats):
        k = 0 if rows.cond_row(s) is None else length if keep[s] is None else int(keep[s].numel())
        ran = rows.uncond_row(s) is not None
        keys_done[s] += k
        cond_t, uncond_t = text_len[s]
        full = scale_flops(cfg, length, keys_full, cond_t) + (
            scale_flops(cfg, length, keys_full, uncond_t) if params[s].uses_uncond else 0)
        run = scale_flops(cfg, k, keys_done[s], cond_t) + (scale_flops(cfg, k, keys_done[s], uncond_t) if ran else 0)
        st.scales.append(ScaleStats(si, grid, length, k, ran, full, run, wall))


def _forward(model: InfinityModel, state, rows: _Rows, keep, feats_BLd, si: int, rope_2LD,
             cache, padded: bool = False, graphs: ScaleGraphs | None = None) -> torch.Tensor | None:
    """Logits (after the head) of the kept tokens, padded view (N, Lmax, V); None if nothing runs."""
    tf = model.transformer
    if si == 0:
        x, layout, rope = tf.start_tokens(state.sos_ND), ScaleLayout.dense_layout(len(rows.src), 1), rope_2LD
    else:
        x, layout, rope = _embed_rows(model, feats_BLd, rows, keep, rope_2LD, padded)
        if layout.total == 0:
            return None
    if graphs is not None:
        pruned = any(keep[s] is not None for s in rows.src)
        return layout.to_padded(graphs.logits(x, si, state, layout, rope, cache, pruned))
    hidden = tf.forward_scale(x, si, state, layout, rope, cache)
    return layout.to_padded(tf.logits(hidden, head_cond(layout, state.sos_ND)))


def _sample_scale(model, si, grid, rows: _Rows, plans: list[ScalePlan], logits_NLV, weights, gens, params,
                  policies, ctxs, history, hist_bits):
    """Guidance, policy observation, sampling and fill for every sample of one scale.

    Returns the residual code map (B, D, h', w') and the token-layout bits (B, L, d).
    """
    preset, dev = model.preset, model.device
    b, length = rows.batch, grid[0] * grid[1]
    vs, nbits = preset.vae_scale, preset.vae.codebook_bits
    grid_vae = (grid[0] * vs, grid[1] * vs)
    codes_out, bits_out = [], []
    inv_tau, w_c, w_u = weights
    for s in range(b):
        plan, c = plans[s], rows.cond_row(s)
        if c is None:  # stopped: adds nothing
            codes = torch.zeros(nbits, *grid_vae, device=dev)
            history[s].append(codes)
            codes_out.append(codes)
            bits_out.append(vae_bits_to_tokens(torch.zeros(1, *grid_vae, nbits, dtype=torch.uint8, device=dev),
                                               preset.spatial_patchify)[0])
            continue
        k = length if plan.keep_idx_K is None else int(plan.keep_idx_K.numel())
        u = rows.uncond_row(s)
        if k:
            cond = logits_NLV[c, :k].float() * inv_tau[s]
            unc = logits_NLV[u, :k].float() * inv_tau[s] if u is not None else None
            guided = cond if unc is None else w_c[s] * cond + w_u[s] * unc
            policies[s].observe(ctxs[s], ScaleObservation(cond, unc))
        if plan.keep_idx_K is None:
            kept_bits = sample_bits_(guided.view(k, -1, 2), params[s].top_k, params[s].top_p, gens[s])
            tok_bits = kept_bits.to(torch.uint8)
            vae_bits = tokens_to_vae_bits(tok_bits[None], grid, preset.spatial_patchify)[0]
            codes = bits_to_codes(vae_bits[None])[0]
        else:
            # the unpruned scale's draw at the kept positions (and the generator advanced as by it,
            # also when nothing is kept)
            keep_idx_K = plan.keep_idx_K.to(dev)
            guided_KdV = guided.view(k, -1, 2) if k else torch.zeros(0, preset.transformer.token_bits, 2, device=dev)
            kept_bits = sample_kept_bits_(guided_KdV, keep_idx_K, length, params[s].top_k, params[s].top_p, gens[s])
            src = hist_bits[s] if plan.fill_from_scale is None else history_bits(history[s], plan.fill_from_scale)
            fill = _fill_bits(src, grid_vae, nbits, dev)
            tok_bits = vae_bits_to_tokens(fill[None], preset.spatial_patchify)[0].clone()
            if k:
                tok_bits[keep_idx_K] = kept_bits.to(torch.uint8)
            vae_bits = tokens_to_vae_bits(tok_bits[None], grid, preset.spatial_patchify)[0]
            codes = bits_to_codes(vae_bits[None])[0]
            if plan.zero_fill:
                mask = torch.zeros(length, dtype=torch.bool, device=dev)
                mask[keep_idx_K] = True
                m = tokens_to_vae_bits(mask[None, :, None].expand(1, length, vs * vs), grid, preset.spatial_patchify)
                codes = codes * m[0, ..., 0].to(codes.dtype)
        history[s].append(codes)
        hist_bits[s] = vae_bits
        codes_out.append(codes)
        bits_out.append(tok_bits)
    return torch.stack(codes_out), torch.stack(bits_out)


def history_bits(history: list[torch.Tensor], scale: int) -> torch.Tensor:
    """Bits (h', w', D) of the residual code map sampled at ``scale`` (codes are +-1/sqrt(D))."""
    return (history[scale] > 0).permute(1, 2, 0).to(torch.uint8)
