"""The LD-Pruning engine: equivalence with the baseline, LHEP/SATS decisions, batching, statistics."""

import math

import pytest
import torch

from model_loader.configs import get_preset
from model_loader.generate import generate as baseline_generate
from model_loader.random_init import random_model
from model_loader.sampling import SamplingParams, sample_bits_, sample_kept_bits_
from model_loader.schedules import TEMPLATES, scale_schedule
from model_loader.text_cond import TextCond
from pruning import FastVARStyle, LDPruning, NoPruning, PruningConfig, SkipVARStyle, generate, pruning_config
from pruning.policy import ScaleContext, ScaleObservation
from pruning.scoring import (
    bit_entropy,
    haar_energy,
    lhep_energy,
    rank_sum,
    select_by_cumulative_energy,
    select_top_fraction,
    smooth_and_resize,
)
from pruning.stats import scale_flops

GRIDS = scale_schedule(1.0, "0.06M")  # 7 scales up to 16x16: LHEP on 5..6 (default), SATS on 3..6


def _text(n: int, seed: int = 0, channels: int = 256) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    lens = [5 + (3 * i) % 7 for i in range(n)]
    feats = torch.zeros(n, max(lens), channels)
    for i, ln in enumerate(lens):
        feats[i, :ln] = torch.randn(ln, channels, generator=g) * 0.2
    return TextCond(feats, torch.tensor(lens))


@pytest.fixture(scope="module", params=["tiny-2b", "tiny-8b"])
def model(request):
    return random_model(get_preset(request.param), seed=3)


PARAMS = [SamplingParams(cfg=3.0, tau=0.5, seed=11), SamplingParams(cfg=4.0, tau=1.0, top_p=0.9, seed=12),
          SamplingParams(cfg=1.0, tau=0.7, seed=13)]


def test_off_equals_baseline_bit_for_bit(model):
    text = _text(3)
    base = baseline_generate(model, text, GRIDS, PARAMS)
    out = generate(model, text, GRIDS, PARAMS, [NoPruning() for _ in PARAMS])
    assert torch.equal(out.images_BHW3, base.images_BHW3)
    for a, b in zip(out.bits_per_scale, base.bits_per_scale, strict=True):
        assert torch.equal(a, b)
    off = generate(model, text, GRIDS, PARAMS, [LDPruning(pruning_config("off")) for _ in PARAMS])
    assert torch.equal(off.images_BHW3, base.images_BHW3)


def test_rho_one_without_sats_equals_baseline(model):
    text = _text(2, seed=1)
    base = baseline_generate(model, text, GRIDS, PARAMS[:2])
    cfg = PruningConfig(energy_keep_ratio=1.0, sats=False)
    out = generate(model, text, GRIDS, PARAMS[:2], [LDPruning(cfg), LDPruning(cfg)])
    assert torch.equal(out.images_BHW3, base.images_BHW3)
    assert all(s.ideal_speedup == 1.0 for s in out.stats)


def test_pruning_changes_work_and_output(model):
    text = _text(2, seed=2)
    base = baseline_generate(model, text, GRIDS, PARAMS[:2])
    out = generate(model, text, GRIDS, PARAMS[:2], [LDPruning(PruningConfig()) for _ in range(2)])
    for st in out.stats:
        assert all(f == 1.0 for f in st.kept_fraction_per_scale[:4])
        assert any(f < 1.0 for f in st.kept_fraction_per_scale[4:])
        assert st.ideal_speedup > 1.2
    assert not torch.equal(out.images_BHW3, base.images_BHW3)


class _Recorded(LDPruning):
    """LD-Pruning that keeps the conditional logits it observes (those of every computed token) and
    the kept tokens of every pruned scale."""

    def __init__(self, cfg: PruningConfig) -> None:
        super().__init__(cfg)
        self.cond: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []

    def plan(self, ctx):
        p = super().plan(ctx)
        if p.keep_idx_K is not None:
            self.kept.append(p.keep_idx_K.clone())
        return p

    def observe(self, ctx, obs):
        self.cond.append(obs.cond_logits_KV.clone())
        super().observe(ctx, obs)


def test_mixed_batch_equals_each_sample_alone(model):
    """Each sample of a mixed batch computes what it computes alone: the same tokens, the same stop,
    its logits equal up to rounding (the blocks run in bf16, as the official dtype policy, and the
    batch's matrices have other shapes: up to 1.4e-3 here, also in a batch of one prompt twice),
    hence its bits, but for a draw that lands within that rounding of its probability (1 bit of
    16,000 once here); where no bit differs the image is identical. A sample mixed up with another
    would differ in about half its bits."""
    configs = [PruningConfig(energy_keep_ratio=0.3, uncond_stop_tol=0.5), pruning_config("off"),
               PruningConfig(energy_keep_ratio=0.8, sats=False), PruningConfig(lhep=False, uncond_stop_tol=0.3)]
    params = PARAMS + [SamplingParams(cfg=2.0, tau=1.0, seed=14)]
    text = _text(4, seed=4)

    batch_pols = [_Recorded(c) for c in configs]
    batch = generate(model, text, GRIDS, params, batch_pols)
    kept = {tuple(s.tokens_computed for s in st.scales) for st in batch.stats}
    assert len(kept) > 1  # rows really carried different token counts (packed layout)
    for i, c in enumerate(configs):
        pol = _Recorded(c)
        alone = generate(model, text.select([i]), GRIDS, [params[i]], [pol])
        assert [s.tokens_computed for s in alone.stats[0].scales] == [s.tokens_computed for s in batch.stats[i].scales]
        assert alone.stats[0].uncond_stop_scale == batch.stats[i].uncond_stop_scale
        assert len(pol.cond) == len(batch_pols[i].cond) == len(GRIDS)
        for a, b in zip(pol.cond, batch_pols[i].cond, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
        differ = [int((a[0] != b[i]).sum()) for a, b in zip(alone.bits_per_scale, batch.bits_per_scale, strict=True)]
        assert sum(differ) <= 1e-3 * sum(a[0].numel() for a in alone.bits_per_scale), f"sample {i}: {differ}"
        if not any(differ):
            assert torch.equal(alone.images_BHW3[0], batch.images_BHW3[i]), f"sample {i}"


@pytest.mark.parametrize("keep", [[0, 3, 4, 9], []])
def test_kept_draw_is_the_unpruned_draw_at_its_positions(keep):
    """A pruned scale's kept tokens get the random numbers of their positions in the unpruned draw,
    and the generator ends where the unpruned draw leaves it (also with nothing kept)."""
    g = torch.Generator().manual_seed(5)
    logits_LdV = torch.randn(12, 32, 2, generator=g) * 2
    keep_idx_K = torch.tensor(keep, dtype=torch.long)
    g_full, g_kept = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    full_Ld = sample_bits_(logits_LdV.clone(), 900, 0.9, g_full)
    kept_Kd = sample_kept_bits_(logits_LdV[keep_idx_K].clone(), keep_idx_K, 12, 900, 0.9, g_kept)
    assert torch.equal(kept_Kd, full_Ld[keep_idx_K])
    assert torch.equal(g_kept.get_state(), g_full.get_state())
    if keep:  # the kept rows alone would have drawn other numbers
        g_alone = torch.Generator().manual_seed(7)
        alone_Kd = sample_bits_(logits_LdV[keep_idx_K].clone(), 900, 0.9, g_alone)
        assert not torch.equal(g_alone.get_state(), g_full.get_state())
        assert not torch.equal(alone_Kd, full_Ld[keep_idx_K])


def test_pruning_one_scale_leaves_the_later_draws_of_the_seed(model):
    """LHEP on scale 4 only: the later, unpruned scales sample with the same random numbers as the
    unpruned run of the seed, so their bits differ only where pruning changed the logits (93-98 %
    of the bits agree on the tiny models; 76-81 % when a pruned scale drew only its kept rows). On
    the last scale alone, the kept tokens' bits agree 99.2-99.8 % (79-84 % on tiny-2b before)."""
    text = _text(2, seed=4)
    params = [SamplingParams(cfg=3.0, tau=0.5, seed=11), SamplingParams(cfg=3.0, tau=0.5, seed=12)]
    base = generate(model, text, GRIDS, params, [NoPruning(), NoPruning()])
    mid = generate(model, text, GRIDS, params, [LDPruning(PruningConfig(lhep_scales=(4,), sats=False))
                                                for _ in params])
    assert [f < 1.0 for f in mid.stats[0].kept_fraction_per_scale] == [False] * 4 + [True, False, False]
    for si in (5, 6):
        agree = (mid.bits_per_scale[si] == base.bits_per_scale[si]).float().mean().item()
        assert agree > 0.9, (si, agree)

    for i in range(2):
        spy = _Recorded(PruningConfig(lhep_last_scales=1, sats=False))
        last = generate(model, text.select([i]), GRIDS, [params[i]], [spy])
        (keep_idx_K,) = spy.kept
        assert 0 < len(keep_idx_K) < 256
        agree = (last.bits_per_scale[-1][0][keep_idx_K] == base.bits_per_scale[-1][i][keep_idx_K]).float().mean()
        assert agree > 0.98, agree


def test_skipped_tokens_add_nothing_by_default_or_the_previous_residual():
    """LHEP on the last scale only, default fill against the paper's: the kept tokens get the same
    bits (same logits, same draw), the skipped ones add nothing (zero) or the previous residual's
    code at their place (nearest), a unit code of +-1/sqrt(D) in every channel."""
    model = random_model(get_preset("tiny-2b"), seed=3)
    assert model.preset.vae_scale == 1 and PruningConfig().fill_mode == "zero"
    text, params = _text(1, seed=6), [SamplingParams(cfg=3.0, tau=0.5, seed=21)]
    spies = {mode: _Recorded(PruningConfig(lhep_last_scales=1, sats=False, fill_mode=mode))
             for mode in ("zero", "nearest")}
    runs = {mode: generate(model, text, GRIDS, params, [spy]) for mode, spy in spies.items()}
    (kept_K,), (kept_nearest_K,) = spies["zero"].kept, spies["nearest"].kept
    assert torch.equal(kept_K, kept_nearest_K) and 0 < len(kept_K) < 256
    skipped_L = torch.ones(256, dtype=torch.bool)
    skipped_L[kept_K] = False
    diff_DL = (runs["nearest"].summed_codes_BDhw - runs["zero"].summed_codes_BDhw)[0].flatten(1)
    assert torch.equal(runs["nearest"].bits_per_scale[-1], runs["zero"].bits_per_scale[-1])
    assert diff_DL[:, ~skipped_L].abs().max() == 0
    unit = 1 / model.preset.vae.codebook_bits ** 0.5
    torch.testing.assert_close(diff_DL[:, skipped_L].abs(), torch.full_like(diff_DL[:, skipped_L], unit))


def test_statistics_add_up(model):
    text = _text(2, seed=5)
    out = generate(model, text, GRIDS, PARAMS[:2], [LDPruning(PruningConfig(uncond_stop_tol=0.6)),
                                                    SkipVARStyle(stop_uncond_from=-2, skip_last=1)])
    cfg = model.transformer.cfg
    for st in out.stats:
        keys = 0
        executed = 0.0
        for sc in st.scales:
            assert 0 <= sc.tokens_computed <= sc.tokens_full == sc.grid[0] * sc.grid[1]
            keys += sc.tokens_computed
            branches = 2 if sc.uncond_ran else 1
            executed_sc = branches * scale_flops(cfg, sc.tokens_computed, keys, int(text.lens_B[out.stats.index(st)]))
            assert math.isclose(sc.flops_executed, executed_sc, rel_tol=1e-9)
            executed += sc.flops_executed
            assert sc.flops_executed <= sc.flops_full
        assert math.isclose(st.ideal_speedup, st.flops_full / executed)
        assert st.tokens_computed <= st.tokens_full
        assert st.tokens_computed == sum(s.tokens_computed * (2 if s.uncond_ran else 1) for s in st.scales)
        ran = [s.uncond_ran for s in st.scales]
        if st.uncond_stop_scale is not None:
            assert ran == [i < st.uncond_stop_scale for i in range(len(ran))]
    skip = out.stats[1]
    assert skip.uncond_stop_scale == len(GRIDS) - 2 and skip.scales[-1].tokens_computed == 0


def test_flops_count_each_branch_with_its_own_text(model):
    """With a negative prompt the unconditional branch attends to the negative prompt's tokens, not
    the prompt's: full and executed FLOPs count each branch with its own text length."""
    text = _text(1, seed=5)  # 5 tokens
    g = torch.Generator().manual_seed(9)
    negative = TextCond(torch.randn(1, 29, 256, generator=g) * 0.2, torch.tensor([29]))
    out = generate(model, text, GRIDS, PARAMS[:1], [LDPruning(PruningConfig(uncond_stop_tol=0.6))], negative=negative)
    cfg, st, keys = model.transformer.cfg, out.stats[0], 0
    for sc in st.scales:
        full_keys = sum(h * w for h, w in GRIDS[:sc.scale_idx + 1])
        assert math.isclose(sc.flops_full, scale_flops(cfg, sc.tokens_full, full_keys, 5)
                            + scale_flops(cfg, sc.tokens_full, full_keys, 29), rel_tol=1e-9)
        keys += sc.tokens_computed
        want = scale_flops(cfg, sc.tokens_computed, keys, 5) + (
            scale_flops(cfg, sc.tokens_computed, keys, 29) if sc.uncond_ran else 0)
        assert math.isclose(sc.flops_executed, want, rel_tol=1e-9)


def test_fastvar_style_keeps_fixed_ratios(model):
    out = generate(model, _text(1), GRIDS, PARAMS[:1], [FastVARStyle({-3: 0.5, -1: 0.0})])
    fr = out.stats[0].kept_fraction_per_scale
    assert fr[:4] == [1.0] * 4 and fr[4] == pytest.approx(0.5, abs=0.02) and fr[5] == 1.0 and fr[6] == 0.0


# ---------------------------------------------------------------------------- LHEP by hand

def test_haar_energy_hand_example():
    # one channel, 2x4: left 2x2 block a vertical edge, right block a checkerboard
    r = torch.tensor([[[1.0, 3.0, 1.0, -1.0],
                       [1.0, 3.0, -1.0, 1.0]]])
    # left: LH = 0.5*(-1+3-1+3) = 2, HL = 0.5*(-1-3+1+3) = 0, HH = 0.5*(-1+3+1-3) = 0 -> 4
    # right: LH = 0.5*(-1-1+1+1) = 0, HL = 0.5*(-1+1-1+1) = 0, HH = 0.5*(-1-1-1-1) = -2 -> 4 ... scaled below
    e = haar_energy(r)
    assert e.shape == (1, 2)
    assert e.tolist() == [[4.0, 4.0]]
    r2 = torch.cat([r, 2 * r])  # a second channel adds 4x the energy
    assert haar_energy(r2).tolist() == [[20.0, 20.0]]
    # odd sides are padded by edge replication: a 3x3 constant map has no high frequency
    assert haar_energy(torch.ones(2, 3, 3)).abs().sum() == 0


def test_smoothing_and_resize_hand_example():
    e = torch.tensor([[9.0, 0.0], [0.0, 0.0]])
    s = smooth_and_resize(e, (2, 2))  # 3x3 mean with zero padding counted: every cell sees the 9 once
    assert torch.allclose(s, torch.full((2, 2), 1.0))
    # 1x4 map: windows of cells 0-2 contain the 18 (18/9 = 2), cell 3's does not
    row = torch.tensor([[0.0, 18.0, 0.0, 0.0]])
    assert smooth_and_resize(row, (1, 4)).tolist() == [[2.0, 2.0, 2.0, 0.0]]
    assert smooth_and_resize(row, (1, 8), mode="nearest").tolist() == [[2.0] * 6 + [0.0] * 2]
    # bilinear, align_corners=False: output x samples input (x + 0.5) / 2 - 0.5 -> 2.25, 2.75, 3.25 (clamped)
    assert smooth_and_resize(row, (1, 8)).tolist()[0][-3:] == pytest.approx([1.5, 0.5, 0.0])
    # "never" resizes only; "auto" averages maps of >= 8 cells a side (the paper's at 1024 px), not smaller
    assert smooth_and_resize(e, (2, 2), smooth="never").tolist() == e.tolist()
    assert smooth_and_resize(e, (2, 2), smooth="auto").tolist() == e.tolist()
    big = torch.zeros(8, 12)
    big[3, 5] = 9.0
    assert torch.equal(smooth_and_resize(big, (8, 12), smooth="auto"), smooth_and_resize(big, (8, 12)))
    assert smooth_and_resize(big, (8, 12), smooth="auto")[2:5, 4:7].eq(1.0).all()
    assert torch.equal(smooth_and_resize(big[:7], (7, 12), smooth="auto"), big[:7])


def test_cumulative_threshold_hand_example():
    e = torch.tensor([5.0, 1.0, 3.0, 1.0])
    assert select_by_cumulative_energy(e, 0.5).tolist() == [0]          # 5 >= 0.5 * 10
    assert select_by_cumulative_energy(e, 0.6).tolist() == [0, 2]       # 5 + 3 >= 6
    assert select_by_cumulative_energy(e, 0.95).tolist() == [0, 1, 2, 3]  # tau = 1 keeps both ties
    assert select_by_cumulative_energy(torch.tensor([2.0, 2.0, 1.0]), 0.3).tolist() == [0, 1]
    assert select_by_cumulative_energy(e, 1.0).tolist() == [0, 1, 2, 3]
    assert select_top_fraction(e, 0.5).tolist() == [0, 2]
    assert select_top_fraction(torch.tensor([1.0, 1.0, 1.0]), 0.34).tolist() == [0, 1]


def test_bit_entropy_and_rank_sum_hand_example():
    # two tokens of two bits: token 0 undecided on both bits (2 ln 2), token 1 certain on both (~0)
    logits = torch.tensor([[0.0, 0.0, 3.0, 3.0], [0.0, 50.0, -50.0, 0.0]])
    torch.testing.assert_close(bit_entropy(logits), torch.tensor([2 * math.log(2), 0.0]), atol=1e-6, rtol=0)
    p = torch.sigmoid(torch.tensor(1.0))  # one bit with logits (0, 1): p(1) = sigmoid(1)
    h = float(-p * p.log() - (1 - p) * (1 - p).log())
    assert float(bit_entropy(torch.tensor([[0.0, 1.0]]))) == pytest.approx(h)
    # ranks 0 = lowest; ties by position: [2, 0, 1] + [0, 1, 2] (ties 0 and 1 of the second score)
    assert rank_sum(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([7.0, 7.0, 9.0])).tolist() == [2.0, 1.0, 3.0]


def test_energy_entropy_ranking_keeps_the_energy_count_and_takes_uncertain_tokens():
    """token_score="energy+entropy": as many tokens as the energy rule keeps, chosen by the sum of the
    energy rank and the rank of the bit entropy last observed (a 4x4 scale, then an 8x8 LHEP scale)."""
    grids = ((1, 1), (2, 2), (4, 4), (8, 8))
    torch.manual_seed(0)
    residual = torch.randn(16, 4, 4) * 0.1  # the 4x4 scale's residual: high-frequency energy at the left
    residual[:, :, :2] += torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 1)
    logits = torch.full((16, 16 * 2), 0.0)
    logits[:, 1::2] = 6.0 + 0.01 * torch.arange(16.0)[:, None]  # confident bits everywhere (no two alike)...
    uncertain = [3, 7, 11, 15, 2, 6]  # ...but on the right column and two of its neighbours
    logits[uncertain, 1::2] = 0.0
    plans = {}
    for score in ("energy", "energy+entropy"):
        pol = LDPruning(PruningConfig(sats=False, lhep_scales=(3,), token_score=score))
        pol.reset(grids)
        for si in range(3):
            ctx = ScaleContext(si, grids, None, None)
            assert pol.plan(ctx).keep_idx_K is None
            n = grids[si][0] * grids[si][1]
            pol.observe(ctx, ScaleObservation(logits[:n] if si == 2 else torch.zeros(n, 32), None))
        plans[score] = pol.plan(ScaleContext(3, grids, residual, None)).keep_idx_K
    energy = lhep_energy(residual, (8, 8), smooth="auto")
    k = select_by_cumulative_energy(energy, 0.5).numel()
    assert plans["energy"].tolist() == select_by_cumulative_energy(energy, 0.5).tolist()
    assert plans["energy+entropy"].numel() == k < 64
    # the expected choice: the 4x4 scale's bit entropy (hand-checked above), bilinear to 8x8
    ent = torch.nn.functional.interpolate(bit_entropy(logits).view(1, 1, 4, 4), size=(8, 8), mode="bilinear",
                                          align_corners=False).flatten()
    er = torch.argsort(torch.argsort(energy, stable=True), stable=True).float()
    hr = torch.argsort(torch.argsort(ent, stable=True), stable=True).float()
    expected = torch.argsort(er + hr, descending=True, stable=True)[:k].sort().values
    assert plans["energy+entropy"].tolist() == expected.tolist()
    right = lambda idx: float((idx % 8 >= 4).float().mean())  # noqa: E731
    assert right(plans["energy+entropy"]) > right(plans["energy"])  # the uncertain side gained tokens


def test_energy_entropy_ranking_in_the_loop(model):
    """In the loop: at the first LHEP scale the ranking computes as many tokens as the energy rule on
    the same trajectory, not the same ones, and the ones it adds were less certain at the scale before."""
    cfg = PruningConfig(sats=False)
    pols = [_Recorded(cfg), _Recorded(PruningConfig(sats=False, token_score="energy+entropy"))]
    out = generate(model, _text(1, seed=5).select([0, 0]), GRIDS, [PARAMS[0], PARAMS[0]], pols)
    first = min(cfg.lhep_set(GRIDS))
    by_energy, by_both = pols[0].kept[0], pols[1].kept[0]
    assert by_energy.numel() == by_both.numel() < GRIDS[first][0] * GRIDS[first][1]
    assert set(by_energy.tolist()) != set(by_both.tolist())
    assert out.stats[1].scales[-1].tokens_computed < out.stats[1].scales[-1].tokens_full  # later scale pruned too
    ent = torch.nn.functional.interpolate(bit_entropy(pols[1].cond[first - 1]).view(1, 1, *GRIDS[first - 1]),
                                          size=GRIDS[first], mode="bilinear", align_corners=False).flatten()
    assert float(ent[by_both].mean()) > float(ent[by_energy].mean())


# ---------------------------------------------------------------------------- SATS by hand

def _obs(delta: float, n: int = 8) -> ScaleObservation:
    cond = torch.zeros(n, 4)
    return ScaleObservation(cond, cond - delta)  # RMS of the difference is exactly delta


def test_sats_stops_at_expected_scale():
    grids = scale_schedule(1.0, "1M")  # 13 scales: SATS on 9..12, Delta measured from 8
    pol = LDPruning(PruningConfig(lhep=False, uncond_stop_tol=0.15))
    pol.reset(grids)
    deltas = {0: 50.0, 8: 10.0, 9: 8.0, 10: 7.5, 11: 7.4, 12: 7.3}
    runs = []
    for si in range(13):
        ctx = ScaleContext(si, grids, None, None)
        plan = pol.plan(ctx)
        runs.append(plan.run_uncond)
        if plan.run_uncond:
            pol.observe(ctx, _obs(deltas.get(si, 20.0)))
    # gamma_9 = 0.2 (>= delta), gamma_10 = 0.0625 < 0.15: decided at 10, effective from 11
    assert pol.gammas[9] == pytest.approx(0.2, rel=1e-5) and pol.gammas[10] == pytest.approx(0.0625, rel=1e-5)
    assert runs == [True] * 11 + [False] * 2
    assert pol.stopped_at == 11


def test_sats_never_stops_with_zero_tolerance_and_force_stop():
    grids = scale_schedule(1.0, "0.25M")
    pol = LDPruning(PruningConfig(lhep=False, uncond_stop_tol=0.0))
    pol.reset(grids)
    for si in range(10):
        ctx = ScaleContext(si, grids, None, None)
        assert pol.plan(ctx).run_uncond
        pol.observe(ctx, _obs(1.0))
    forced = LDPruning(PruningConfig(lhep=False, sats=False, force_stop_scale=7))
    forced.reset(grids)
    assert [forced.plan(ScaleContext(si, grids, None, None)).run_uncond for si in range(10)] == [True] * 7 + [False] * 3


# ---------------------------------------------------------------------------- settings

@pytest.mark.parametrize("kw,field", [({"energy_keep_ratio": 0.0}, "energy_keep_ratio"),
                                      ({"uncond_stop_tol": -1}, "uncond_stop_tol"),
                                      ({"lhep_scales": (0, 5)}, "lhep_scales"),
                                      ({"fill_mode": "bicubic"}, "fill_mode"),
                                      ({"energy_smoothing": "gaussian"}, "energy_smoothing"),
                                      ({"token_score": "entropy"}, "token_score"),
                                      ({"lhep_last_scales": -1}, "lhep_last_scales"),
                                      ({"sats_last_scales": None}, "sats_last_scales"),
                                      ({"force_keep_fraction": 1.5}, "force_keep_fraction")])
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        PruningConfig(**kw)


def test_presets_and_scale_sets():
    with pytest.raises(ValueError, match="unknown preset"):
        pruning_config("turbo")
    with pytest.raises(ValueError, match="unknown field"):
        pruning_config("balanced", rho=0.3)
    bal = pruning_config("balanced")
    assert bal.energy_keep_ratio == 0.5 and bal.uncond_stop_tol == 0.15
    g1024, g512, g256 = (scale_schedule(1.0, pn) for pn in ("1M", "0.25M", "0.06M"))
    assert bal.lhep_set(g1024) == {10, 11, 12} and bal.sats_set(g1024) == {9, 10, 11, 12}  # the paper's sets
    assert bal.lhep_set(g512) == {7, 8, 9} and bal.sats_set(g512) == {6, 7, 8, 9}
    assert bal.lhep_set(g256) == {5, 6} and bal.sats_set(g256) == {3, 4, 5, 6}  # 12x12 and 16x16: 77 % of tokens
    # every template of the 512-1024 px schedules: the last 3 scales; 256 px: the last 2
    for pn, last in (("1M", 3), ("0.60M", 3), ("0.25M", 3), ("0.06M", 2)):
        for ratio in TEMPLATES:
            g = scale_schedule(ratio, pn)
            assert bal.lhep_set(g) == set(range(len(g) - last, len(g))), (pn, ratio)
    assert PruningConfig(lhep_last_scales=3).lhep_set(g256) == {4, 5, 6}
    assert not pruning_config("off").enabled
    light = pruning_config("light")
    assert light.energy_keep_ratio == 0.5 and light.lhep_set(g256) == {6} and light.sats_set(g256) == bal.sats_set(g256)


def test_padded_layout_equals_packed(model):
    configs = [PruningConfig(energy_keep_ratio=0.3, sats=False), PruningConfig(energy_keep_ratio=0.9, sats=False)]
    text = _text(2, seed=6)
    packed = generate(model, text, GRIDS, PARAMS[:2], [LDPruning(c) for c in configs])
    padded = generate(model, text, GRIDS, PARAMS[:2], [LDPruning(c) for c in configs], padded=True)
    assert [s.tokens_computed for s in packed.stats] == [s.tokens_computed for s in padded.stats]
    assert len({s.tokens_computed for s in packed.stats}) == 2
    for a, b in zip(packed.bits_per_scale, padded.bits_per_scale, strict=True):
        assert torch.equal(a, b)


def test_scale_callback_previews_the_sum_so_far_and_changes_nothing(model):
    """on_scale runs after every scale; its previews decode the codes summed so far (after the last
    scale: the final image; before, further from it the earlier), and calling them leaves the images
    and the per-scale statistics' work unchanged."""
    text = _text(2, seed=4)
    pol = lambda: [LDPruning(PruningConfig()) for _ in range(2)]  # noqa: E731
    plain = generate(model, text, GRIDS, PARAMS[:2], pol())
    seen, previews = [], {}

    def on_scale(si, preview):
        seen.append(si)
        previews[si] = preview([1] if si % 2 else [0, 1])

    out = generate(model, text, GRIDS, PARAMS[:2], pol(), on_scale=on_scale)
    assert seen == list(range(len(GRIDS)))
    assert torch.equal(out.images_BHW3, plain.images_BHW3)
    assert [s.tokens_computed for s in out.stats] == [s.tokens_computed for s in plain.stats]
    h, w = out.images_BHW3.shape[1:3]
    assert previews[0].shape == (2, h, w, 3) and previews[1].shape == (1, h, w, 3)
    assert previews[0].dtype == torch.uint8
    final = out.images_BHW3.float()
    err = [(previews[si][-1].float() - final[1]).abs().mean().item() for si in seen]
    assert err[-1] == 0 and 0 < err[-2] < err[0]


def test_stopped_samples_leave_the_batch_and_the_others_run_as_alone(model):
    """A sample stopped between scales (its request canceled) computes nothing more and is not
    decoded; the samples left run bit for bit as they would have alone (rows leave the batch, as
    stopped uncond rows do); stopping every sample ends the loop with nothing decoded."""
    configs = [PruningConfig(), None, PruningConfig(energy_keep_ratio=0.5, sats=False)]
    params = PARAMS[:2] + [SamplingParams(cfg=2.0, tau=1.0, seed=21)]
    text = _text(3, seed=8)

    def pol():
        return [NoPruning() if c is None else LDPruning(c) for c in configs]

    full = generate(model, text, GRIDS, params, pol())
    asked = []

    def stop_1_after_3():
        asked.append(1)
        return {1} if len(asked) > 3 else set()

    out = generate(model, text, GRIDS, params, pol(), stopped=stop_1_after_3)
    assert len(asked) > len(GRIDS) + 1  # before every scale, before the decode, and during it
    for s in (0, 2):
        assert torch.equal(out.images_BHW3[s], full.images_BHW3[s]), f"sample {s}"
        assert out.stats[s].tokens_computed == full.stats[s].tokens_computed
        assert out.stats[s].ideal_speedup == full.stats[s].ideal_speedup  # FLOPs with their own text lengths
        assert out.stats[s].uncond_stop_scale == full.stats[s].uncond_stop_scale
    assert not out.images_BHW3[1].any()  # not decoded
    ran = [sc.tokens_computed for sc in out.stats[1].scales]
    assert ran[:3] == [sc.tokens_computed for sc in full.stats[1].scales][:3] and not any(ran[3:])
    gone = generate(model, text, GRIDS, params, pol(), stopped=lambda: {0, 1, 2})
    assert not gone.images_BHW3.any() and all(st.tokens_computed == 0 for st in gone.stats)


def test_a_sample_stopped_during_the_final_decode_stops_there(model):
    """The final decode asks ``stopped()`` before each image and between the decoder's blocks: a
    sample canceled mid-decode is not decoded further (its image zero, it counts as stopped), the
    others' images are unchanged; one canceled after its own decode ended counts as stopped too."""
    params, text = PARAMS[:3], _text(3, seed=9)
    full = generate(model, text, GRIDS, params, [NoPruning() for _ in params])
    scales = len(GRIDS) + 1  # asks before the decode began
    for target, after in ((0, scales + 1), (1, scales + 2), (0, None)):
        asked: list[int] = []

        def stop(target: int = target, after: int | None = after, asked: list[int] = asked) -> set[int]:
            asked.append(1)
            return {target} if after is not None and len(asked) > after else set()

        out = generate(model, text, GRIDS, params, [NoPruning() for _ in params], stopped=stop)
        if after is None:  # never stopped: every image as the batched decode makes it
            assert torch.equal(out.images_BHW3, full.images_BHW3) and not out.stopped
            continue
        assert out.stopped == {target}
        assert not out.images_BHW3[target].any()
        for s in set(range(3)) - {target}:
            assert torch.equal(out.images_BHW3[s], full.images_BHW3[s]), f"sample {s}"
    last = []

    def stop_at_the_end() -> set[int]:  # the cancel lands after every image was decoded
        last.append(1)
        return {2} if len(last) == len(asked) else set()

    out = generate(model, text, GRIDS, params, [NoPruning() for _ in params], stopped=stop_at_the_end)
    assert out.stopped == {2} and not out.images_BHW3[2].any()
    assert torch.equal(out.images_BHW3[:2], full.images_BHW3[:2])
    with torch.inference_mode():  # the decoder itself
        summed = torch.randn(1, model.vae.bits, *GRIDS[-1])
        assert model.vae.decode_one(summed, lambda: True) is None
        assert torch.equal(model.vae.decode_one(summed, lambda: False), model.vae.decode(summed))


def test_absolute_scale_sets_past_the_schedule_are_refused(model):
    """They did nothing, silently: LHEP on scale 12 of a 7-scale schedule prunes nothing."""
    with pytest.raises(ValueError, match=r"pruning\.lhep_scales: scale\(s\) \[12\] past the end"):
        generate(model, _text(1), GRIDS, PARAMS[:1], [LDPruning(PruningConfig(lhep_scales=(5, 12)))])
    with pytest.raises(ValueError, match=r"pruning\.force_stop_scale: 9 is past the end"):
        generate(model, _text(1), GRIDS, PARAMS[:1], [LDPruning(PruningConfig(force_stop_scale=9))])
    with pytest.raises(ValueError, match=r"pruning\.sats_scales: scale 0 has no earlier"):
        PruningConfig(sats_scales=(0, 3))
