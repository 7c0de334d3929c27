"""The LD-Pruning engine: equivalence with the baseline, LHEP/SATS decisions, batching, statistics."""

import math

import pytest
import torch

from model_loader.configs import get_preset
from model_loader.generate import generate as baseline_generate
from model_loader.random_init import random_model
from model_loader.sampling import SamplingParams
from model_loader.schedules import scale_schedule
from model_loader.text_cond import TextCond
from pruning import FastVARStyle, LDPruning, NoPruning, PruningConfig, SkipVARStyle, generate, pruning_config
from pruning.policy import ScaleContext, ScaleObservation
from pruning.scoring import haar_energy, select_by_cumulative_energy, select_top_fraction, smooth_and_resize
from pruning.stats import scale_flops

GRIDS = scale_schedule(1.0, "0.06M")  # 7 scales up to 16x16: LHEP on 4..6, SATS on 3..6


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


def test_mixed_batch_equals_each_sample_alone(model):
    configs = [PruningConfig(energy_keep_ratio=0.3, uncond_stop_tol=0.5), None,
               PruningConfig(energy_keep_ratio=0.8, sats=False), PruningConfig(lhep=False, uncond_stop_tol=0.3)]
    params = PARAMS + [SamplingParams(cfg=2.0, tau=1.0, seed=14)]
    text = _text(4, seed=4)

    def pol(c):
        return NoPruning() if c is None else LDPruning(c)

    batch = generate(model, text, GRIDS, params, [pol(c) for c in configs])
    kept = {tuple(s.tokens_computed for s in st.scales) for st in batch.stats}
    assert len(kept) > 1  # rows really carried different token counts (packed layout)
    for i, c in enumerate(configs):
        alone = generate(model, text.select([i]), GRIDS, [params[i]], [pol(c)])
        assert torch.equal(alone.images_BHW3[0], batch.images_BHW3[i]), f"sample {i}"
        for a, b in zip(alone.bits_per_scale, batch.bits_per_scale, strict=True):
            assert torch.equal(a[0], b[i])
        assert alone.stats[0].uncond_stop_scale == batch.stats[i].uncond_stop_scale


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


def test_cumulative_threshold_hand_example():
    e = torch.tensor([5.0, 1.0, 3.0, 1.0])
    assert select_by_cumulative_energy(e, 0.5).tolist() == [0]          # 5 >= 0.5 * 10
    assert select_by_cumulative_energy(e, 0.6).tolist() == [0, 2]       # 5 + 3 >= 6
    assert select_by_cumulative_energy(e, 0.95).tolist() == [0, 1, 2, 3]  # tau = 1 keeps both ties
    assert select_by_cumulative_energy(torch.tensor([2.0, 2.0, 1.0]), 0.3).tolist() == [0, 1]
    assert select_by_cumulative_energy(e, 1.0).tolist() == [0, 1, 2, 3]
    assert select_top_fraction(e, 0.5).tolist() == [0, 2]
    assert select_top_fraction(torch.tensor([1.0, 1.0, 1.0]), 0.34).tolist() == [0, 1]


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
    assert bal.lhep_set(13) == {10, 11, 12} and bal.sats_set(13) == {9, 10, 11, 12}
    assert bal.lhep_set(10) == {7, 8, 9} and bal.sats_set(10) == {6, 7, 8, 9}
    assert not pruning_config("off").enabled


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
    assert len(asked) == len(GRIDS) + 1  # before every scale and before the decode
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
