"""CPU speed benchmark of the pruning policies against the unpruned loop, side by side.

    python -m pruning.bench [--repeats 3] [--json] [--sweep 0.2,0.35,0.5,0.75] [--quick]

One process, one random-weight Infinity-shaped model (``bench-512``), the 512x512 schedule
(pn 0.25M, 10 scales, 2,521 tokens), the same prompts and seeds for every policy; runs are
interleaved (round robin over policies, ``--repeats`` rounds) and the median is reported.
``speedup`` is unpruned over pruned wall time of the generation loop (transformer, sampling
and accumulation; text encoding and VAE decode excluded, they do not change with pruning),
``ideal_speedup`` the FLOP ratio, ``efficiency`` their quotient. Random weights make LHEP masks
arbitrary, so ``--sweep`` forces keep fractions to chart speedup against the kept fraction.

Why this model: head width 128 as in the real models; width 768 so that linear layers dominate
attention at 512 px like in Infinity-2B (at the last scale attention is ~1/3 of the linear
FLOPs here, ~1/5 for 2B); depth 4 to fit a 2-core CPU (relative costs per scale do not depend
on depth). float32: this CPU has no bf16 matrix units (AVX2 only; bf16 matmul measured ~6x slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

import torch

from model_loader.configs import ModelPreset, SamplingDefaults, TransformerConfig, VAEConfig, register_preset
from model_loader.random_init import random_model
from model_loader.sampling import SamplingParams
from model_loader.schedules import scale_schedule
from model_loader.text_cond import TextCond

from .config import PruningConfig
from .loop import generate
from .policy import FastVARStyle, LDPruning, NoPruning, SkipVARStyle

BENCH_512 = register_preset(ModelPreset(
    name="bench-512",
    transformer=TransformerConfig(depth=4, embed_dim=768, num_heads=6, block_chunks=2, token_bits=32,
                                  text_channels=256),
    vae=VAEConfig(codebook_bits=32, patch_size=16, encoder_ch_mult=(1, 1, 1, 1, 1),
                  decoder_ch_mult=(1, 1, 1, 1, 1), base_ch=32),
    spatial_patchify=False, pn="0.25M", sampling=SamplingDefaults(cfg=3.0, tau=0.5),
    checkpoint_layout="safetensors", text_encoder="tiny-t5",
    description="CPU benchmark: Infinity-shaped random weights at 512 px",
))
SMOKE = register_preset(ModelPreset(
    name="bench-smoke",
    transformer=TransformerConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=2, token_bits=32,
                                  text_channels=256),
    vae=BENCH_512.vae, spatial_patchify=False, pn="0.06M", sampling=SamplingDefaults(cfg=3.0, tau=0.5),
    checkpoint_layout="safetensors", text_encoder="tiny-t5", description="tiny smoke-test benchmark model",
))


def policy_factories(num_scales: int, sweep: list[float]) -> dict[str, callable]:
    n = num_scales
    out = {
        "unpruned": NoPruning,
        "ld-pruning": lambda: LDPruning(PruningConfig()),
        "lhep-only": lambda: LDPruning(PruningConfig(sats=False)),
        "sats-only": lambda: LDPruning(PruningConfig(lhep=False)),
        "fastvar-style": FastVARStyle,
        "skipvar-style": lambda: SkipVARStyle(stop_uncond_from=-3),
        "forced-0.35+sats@-4": lambda: LDPruning(PruningConfig(force_keep_fraction=0.35, sats=False,
                                                               force_stop_scale=n - 4, lhep_last_scales=3)),
    }
    for f in sweep:  # forced fractions on the last 3 scales whatever the schedule (the paper's count)
        out[f"forced-{f:g}"] = lambda f=f: LDPruning(PruningConfig(force_keep_fraction=f, sats=False,
                                                                   lhep_last_scales=3))
    return out


def _text(n: int, channels: int, seed: int = 0, tokens: int = 24) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(n, tokens, channels, generator=g) * 0.2, torch.full((n,), tokens))


@dataclass
class Run:
    wall_s: float
    ideal: float
    kept: list[float]


def run_once(model, text, grids, params, policies, padded: bool = False) -> tuple[float, list]:
    """Generation-loop wall time (the sum of the batch-level per-scale walls) and the stats."""
    out = generate(model, text, grids, params, policies, padded=padded)
    return out.stats[0].wall_s, out.stats


def bench_policies(model, grids, factories: dict, repeats: int, seed: int = 0) -> dict[str, list[Run]]:
    text = _text(1, model.preset.transformer.text_channels)
    params = [SamplingParams(cfg=3.0, tau=0.5, seed=seed)]
    runs: dict[str, list[Run]] = {name: [] for name in factories}
    for make in factories.values():  # warm-up: first calls of every code path are slower
        run_once(model, text, grids, params, [make()])
    for _ in range(repeats):
        for name, make in factories.items():
            wall, stats = run_once(model, text, grids, params, [make()])
            runs[name].append(Run(wall, stats[0].ideal_speedup, stats[0].kept_fraction_per_scale))
    return runs


def summarize(runs: dict[str, list[Run]]) -> list[dict]:
    base = statistics.median(r.wall_s for r in runs["unpruned"])
    rows = []
    for name, rs in runs.items():
        wall = statistics.median(r.wall_s for r in rs)
        ideal = statistics.median(r.ideal for r in rs)
        speed = base / wall
        rows.append({"policy": name, "wall_s": round(wall, 4), "speedup": round(speed, 3),
                     "ideal_speedup": round(ideal, 3), "efficiency": round(speed / ideal, 3),
                     "kept_fraction_per_scale": [round(k, 3) for k in rs[0].kept],
                     "runs": len(rs)})
    return rows


def bench_batching(model, grids, repeats: int) -> dict:
    """Per-image cost of a batch of 4 with heterogeneous masks vs the same 4 run one by one,
    and packed vs padded layouts for that batch."""
    ratios = [0.25, 0.5, 0.75, 1.0]
    cfgs = [PruningConfig(energy_keep_ratio=r, sats=False) for r in ratios]
    text = _text(4, model.preset.transformer.text_channels, seed=1)
    params = [SamplingParams(cfg=3.0, tau=0.5, seed=i) for i in range(4)]
    singles, packed, padded = [], [], []
    for _ in range(repeats):
        singles.append(sum(run_once(model, text.select([i]), grids, [params[i]], [LDPruning(cfgs[i])])[0]
                           for i in range(4)) / 4)
        packed.append(run_once(model, text, grids, params, [LDPruning(c) for c in cfgs])[0] / 4)
        padded.append(run_once(model, text, grids, params, [LDPruning(c) for c in cfgs], padded=True)[0] / 4)
    s, pk, pd = (statistics.median(x) for x in (singles, packed, padded))
    return {"policy": "batch4-heterogeneous", "per_image_batch1_s": round(s, 4),
            "per_image_batch4_packed_s": round(pk, 4), "per_image_batch4_padded_s": round(pd, 4),
            "batch4_over_batch1": round(pk / s, 3), "padded_over_packed": round(pd / pk, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="LD-Pruning CPU speed benchmark")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object per policy on stdout")
    ap.add_argument("--sweep", default="0.2,0.35,0.5,0.75", help="forced keep fractions to chart")
    ap.add_argument("--smoke", action="store_true", help="tiny model and schedule (tests)")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch-of-4 comparison")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = SMOKE if args.smoke else BENCH_512
    model = random_model(preset, seed=0)
    grids = scale_schedule(1.0, preset.pn)
    sweep = [float(x) for x in args.sweep.split(",") if x]
    rows = summarize(bench_policies(model, grids, policy_factories(len(grids), sweep), args.repeats))
    if not args.no_batch:
        rows.append(bench_batching(model, grids, args.repeats))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"model {preset.name} ({preset.description}); schedule {preset.pn}, {len(grids)} scales; "
          f"median of {args.repeats}; threads {torch.get_num_threads()}")
    print(f"{'policy':<24} {'wall s':>8} {'speedup':>8} {'ideal':>7} {'effic.':>7}  kept fraction per scale")
    for r in rows:
        if "speedup" in r:
            kept = " ".join(f"{k:.2f}" for k in r["kept_fraction_per_scale"])
            print(f"{r['policy']:<24} {r['wall_s']:>8.3f} {r['speedup']:>8.3f} {r['ideal_speedup']:>7.3f} "
                  f"{r['efficiency']:>7.3f}  {kept}")
        else:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
