"""The CUDA-graph runner's bookkeeping, on CPU: fixed input buffers, the persistent KV cache and
the text slots must give the eager loop's results bit for bit, batch after batch (on a GPU the same
buffers are what captured graphs read; benchmarks/gpu_bench.py --graphs checks the replays there)."""

import torch

from model_loader.configs import get_preset
from model_loader.random_init import random_model
from model_loader.sampling import SamplingParams
from model_loader.schedules import scale_schedule
from pruning import LDPruning, NoPruning, PruningConfig, generate
from pruning.cuda_graphs import ScaleGraphs
from tests.test_pruning import _text

GRIDS = scale_schedule(1.0, "0.06M")


def _same(a, b) -> None:
    assert torch.equal(a.images_BHW3, b.images_BHW3)
    for x, y in zip(a.bits_per_scale, b.bits_per_scale, strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a.stats, b.stats, strict=True):
        assert [s.tokens_computed for s in sa.scales] == [s.tokens_computed for s in sb.scales]
        assert sa.uncond_stop_scale == sb.uncond_stop_scale


def test_graph_buffers_reproduce_the_eager_loop_across_batches():
    model = random_model(get_preset("tiny-2b"), seed=3)
    graphs = ScaleGraphs(model, capture=False, pruned_shapes=True)
    forced = PruningConfig(force_keep_fraction=0.35, sats=False, force_stop_scale=len(GRIDS) - 3)
    runs = [  # (text seed, params, policy factory): same shapes twice (buffers reused), new text, pruned
        (0, SamplingParams(cfg=3.0, tau=0.5, seed=1), NoPruning),
        (1, SamplingParams(cfg=3.0, tau=0.5, seed=2), NoPruning),
        (1, SamplingParams(cfg=3.0, tau=0.5, seed=3), lambda: LDPruning(forced)),
        (2, SamplingParams(cfg=3.0, tau=0.5, seed=4), lambda: LDPruning(forced)),
        (0, SamplingParams(cfg=3.0, tau=1.0, seed=5), lambda: LDPruning(PruningConfig(uncond_stop_tol=0.5))),
    ]
    for text_seed, p, make in runs:
        text = _text(1, seed=text_seed)
        _same(generate(model, text, GRIDS, [p], [make()], graphs=graphs), generate(model, text, GRIDS, [p], [make()]))
    n_scales = len(GRIDS)
    # every scale of these batch-1 runs has equal rows: all went through the graph path's buffers
    assert graphs.stats.eager == n_scales * len(runs) and not graphs.stats.failed
    assert len(graphs._graphs) >= n_scales + 3  # unpruned shapes, then the pruned scales' own


def test_mixed_batch_falls_back_to_eager_for_unequal_rows():
    model = random_model(get_preset("tiny-2b"), seed=3)
    graphs = ScaleGraphs(model, capture=False)
    params = [SamplingParams(cfg=3.0, seed=7), SamplingParams(cfg=2.0, seed=8)]
    pols = [lambda: LDPruning(PruningConfig(energy_keep_ratio=0.3, sats=False)), NoPruning]
    text = _text(2, seed=3)
    _same(generate(model, text, GRIDS, params, [m() for m in pols], graphs=graphs),
          generate(model, text, GRIDS, params, [m() for m in pols]))
    assert len(graphs._graphs) < len(GRIDS)  # packed scales ran eagerly, outside the graph store


def test_pruned_shapes_stay_eager_by_default_and_caches_share_one_buffer():
    model = random_model(get_preset("tiny-2b"), seed=3)
    graphs = ScaleGraphs(model, capture=False)
    p = SamplingParams(cfg=3.0, seed=1)
    pol = PruningConfig(force_keep_fraction=0.35, sats=False)
    text = _text(1, seed=1)
    _same(generate(model, text, GRIDS, [p], [LDPruning(pol)], graphs=graphs),
          generate(model, text, GRIDS, [p], [LDPruning(pol)]))
    assert len(pol.lhep_set(GRIDS)) == 2  # 12x12 and 16x16 on this 7-scale schedule
    assert len(graphs._graphs) == len(GRIDS) - 2  # the LHEP scales were not stored

    cap = graphs._storage.capacity
    two, one = graphs.kv_cache(2, cap, torch.float32), graphs.kv_cache(1, cap - 5, torch.float32)
    assert two.k[0].data_ptr() == one.k[0].data_ptr() == graphs._storage.k[0].data_ptr()
    assert one.k[0].shape[0] == 1 and one.k[0].shape[2] == cap - 5
    graphs.kv_cache(3, cap, torch.float32)  # more rows than stored: reallocated, graphs dropped
    assert graphs._storage.n_rows == 3 and not graphs._graphs


def test_text_buckets_share_graphs_across_prompt_lengths():
    """With text_bucket, prompts of 5 and 9 tokens use one padded, masked text slot and the same
    graph keys; the masked attention agrees with the eager loop to rounding."""
    model = random_model(get_preset("tiny-2b"), seed=3)
    graphs = ScaleGraphs(model, capture=False, text_bucket=16)
    p = SamplingParams(cfg=3.0, tau=1.0, seed=2)
    agree = []
    for seed in (0, 2):  # _text(1, seed) has 5 tokens; widen the second to 9 tokens
        text = _text(1, seed=seed)
        if seed == 2:
            g = torch.Generator().manual_seed(9)
            text = type(text)(torch.randn(1, 9, 256, generator=g) * 0.2, torch.tensor([9]))
        a = generate(model, text, GRIDS, [p], [NoPruning()], graphs=graphs)
        b = generate(model, text, GRIDS, [p], [NoPruning()])
        agree.append(float(torch.cat([(x == y).flatten() for x, y in zip(a.bits_per_scale, b.bits_per_scale,
                                                                           strict=True)]).float().mean()))
        diff = (a.images_BHW3.float() - b.images_BHW3.float()).abs()
        assert float(diff.mean()) < 1.0
    assert min(agree) > 0.999
    assert len(graphs._graphs) == len(GRIDS) and list(graphs._text) == [(2, 16, False)]
