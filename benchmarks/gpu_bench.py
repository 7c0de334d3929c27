"""GPU latency of the unpruned loop vs LD-Pruning on Infinity-2B/8B-shaped random bf16 weights.

    python benchmarks/gpu_bench.py [--models 2b,8b] [--repeats 5] [--json]   # on a CUDA machine
    python benchmarks/gpu_bench.py --smoke                                    # tiny model on CPU

At 1024x1024 (13 scales): unpruned, and LD-Pruning with a forced keep fraction of 0.35 on
the last three scales plus the unconditional branch stopped from scale 10. Weights are
random (built directly on the device: blocks bf16, the rest fp32, the official policy) and
the text is random features of 64 tokens, so only speed is meaningful. Timed with CUDA
events around the whole generation (text state, 13 scales, VAE decode), after one warm-up,
median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_loader.configs import get_preset  # noqa: E402
from model_loader.model import InfinityModel  # noqa: E402
from model_loader.random_init import _std_for  # noqa: E402
from model_loader.sampling import SamplingParams  # noqa: E402
from model_loader.schedules import scale_schedule  # noqa: E402
from model_loader.text_cond import TextCond  # noqa: E402
from model_loader.transformer import build_transformer  # noqa: E402
from model_loader.vae import build_vae  # noqa: E402
from pruning.config import PruningConfig  # noqa: E402
from pruning.cuda_graphs import ScaleGraphs  # noqa: E402
from pruning.loop import generate  # noqa: E402
from pruning.policy import LDPruning, NoPruning  # noqa: E402

MODELS = {"2b": "infinity-2b", "8b": "infinity-8b", "smoke": "tiny-2b"}


@torch.no_grad()
def random_model_on(preset_name: str, device: torch.device, bf16_blocks: bool) -> InfinityModel:
    """Random weights allocated on ``device`` directly (an 8B fp32 copy on the host would be 33 GB)."""
    preset = get_preset(preset_name)
    gen = torch.Generator(device=device).manual_seed(0)
    modules = []
    for module in (build_transformer(preset.transformer, "meta"), build_vae(preset.vae, "meta")):
        module = module.to_empty(device=device)
        for name, p in module.named_parameters():
            mean, std = _std_for(name, p)
            dtype = torch.bfloat16 if (bf16_blocks and name.startswith("block_chunks.")) else torch.float32
            p.data = (torch.randn(p.shape, generator=gen, device=device) * std + mean).to(dtype)
        for buf in module.buffers():
            buf.copy_(torch.zeros_like(buf) if buf.is_floating_point() else
                      2 ** torch.arange(buf.numel() - 1, -1, -1, device=device))
        modules.append(module.eval().requires_grad_(False))
    return InfinityModel(preset, modules[0], modules[1], None,
                         torch.bfloat16 if bf16_blocks else torch.float32)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(model, text, grids, params, policies, key: str, out: Path, device: torch.device) -> None:
    """One run of each policy under torch.profiler: ``<out>/<model>_<policy>.txt`` (top ops by
    device time, or CPU time without a GPU) and a Chrome trace ``.json`` beside it."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name, make in policies.items():
        with torch_profile(activities=acts) as prof:
            generate(model, text, grids, params, [make() for _ in params])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        stem = f"{key}_{''.join(c if c.isalnum() else '-' for c in name)}"
        (out / f"{stem}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
        prof.export_chrome_trace(str(out / f"{stem}.json"))


def bench_model(key: str, device: torch.device, repeats: int, smoke: bool,
                profile_dir: Path | None = None, diagnose: bool = False, graphs: bool = False,
                batch: int = 1, text_tokens: int = 64, text_bucket: int = 1) -> list[dict]:
    model = random_model_on(MODELS[key], device, bf16_blocks=device.type == "cuda")
    grids = scale_schedule(1.0, "0.06M" if smoke else "1M")
    n = len(grids)
    g = torch.Generator().manual_seed(1)
    text = TextCond(torch.randn(batch, text_tokens, model.preset.transformer.text_channels, generator=g) * 0.2,
                    torch.tensor([text_tokens] * batch)).to(device)
    params = [SamplingParams(cfg=3.0, tau=0.5, seed=i) for i in range(batch)]
    pruned_cfg = PruningConfig(force_keep_fraction=0.35, sats=False, force_stop_scale=n - 3)
    policies = {"unpruned": NoPruning, f"ld-forced-0.35+stop@{n - 3}": lambda: LDPruning(pruned_cfg)}
    if diagnose:  # each half alone: which one loses the time
        keep_only = PruningConfig(force_keep_fraction=0.35, sats=False)
        stop_only = PruningConfig(lhep=False, sats=False, force_stop_scale=n - 3)
        policies["forced-0.35 only"] = lambda: LDPruning(keep_only)
        policies[f"stop@{n - 3} only"] = lambda: LDPruning(stop_only)
    # forced keep: fixed shapes, so pruned scales are captured too
    runner = ScaleGraphs(model, pruned_shapes=True, text_bucket=text_bucket) if graphs else None
    if graphs:  # every policy once more with captured CUDA graphs (same seeds: outputs compared)
        policies.update({f"{k} [graphs]": v for k, v in list(policies.items())})
    times: dict[str, list[float]] = {k: [] for k in policies}
    scale_walls: dict[str, list[list[float]]] = {k: [] for k in policies}
    ideal: dict[str, float] = {}
    images: dict[str, torch.Tensor] = {}

    def run(name):
        out = generate(model, text, grids, params, [policies[name]() for _ in range(batch)],
                       graphs=runner if name.endswith("[graphs]") else None)
        ideal[name] = out.stats[0].ideal_speedup
        scale_walls[name].append([sc.wall_s for sc in out.stats[0].scales])
        images[name] = out.images_BHW3

    for name in policies:  # warm-up (captures the graphs)
        run(name)
        scale_walls[name].clear()
    for _ in range(repeats):  # interleaved
        for name in policies:
            times[name].append(timed(lambda name=name: run(name), device))
    if profile_dir is not None:
        profile(model, text, grids, params, {k: v for k, v in policies.items() if not k.endswith("[graphs]")},
                key, profile_dir, device)
    base = statistics.median(times["unpruned"])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        per_scale = [statistics.median(col) for col in zip(*scale_walls[name], strict=True)]
        rows.append({"card": card, "model": MODELS[key], "policy": name, "latency_s": round(med, 4),
                     "speedup": round(base / med, 3), "ideal_speedup": round(ideal[name], 3),
                     # per scale (CUDA events on a GPU): where the time goes; outside_scales_ms = text
                     # state, cache set-up, VAE decode
                     "scale_wall_ms": [round(1e3 * w, 2) for w in per_scale],
                     "outside_scales_ms": round(1e3 * (med - sum(per_scale)), 2),
                     "batch": batch, "text_tokens": text_tokens, "repeats": repeats,
                     "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                     if device.type == "cuda" else None})
        if name.endswith("[graphs]"):  # vs the eager run of the same policy, and the graphed unpruned run
            eager = name.removesuffix(" [graphs]")
            rows[-1].update({"same_images_as_eager": bool(torch.equal(images[name], images[eager])),
                             "speedup_vs_graphed_unpruned":
                                 round(statistics.median(times["unpruned [graphs]"]) / med, 3),
                             "graph_stats": dataclasses.asdict(runner.stats)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="2b,8b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 256 px, on CPU")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", type=Path, help="also write a torch.profiler table and trace per policy here")
    ap.add_argument("--diagnose", action="store_true", help="also time the keep fraction and the stop alone")
    ap.add_argument("--graphs", action="store_true",
                    help="also run every policy with captured CUDA graphs (pruning.cuda_graphs); on CPU the "
                         "same buffers run eagerly")
    ap.add_argument("--batch", type=int, default=1, help="prompts per generation (same policy for all)")
    ap.add_argument("--text-tokens", type=int, default=64, help="prompt length in tokens")
    ap.add_argument("--text-bucket", type=int, default=1,
                    help="graphs: round text lengths up to this (the service uses 32; padded keys masked)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    keys = ["smoke"] if args.smoke else args.models.split(",")
    rows = []
    for k in keys:
        model_rows = bench_model(k, device, args.repeats, args.smoke, args.profile, args.diagnose, args.graphs,
                                 args.batch, args.text_tokens, args.text_bucket)
        for r in model_rows:  # printed per model, so a run cut short keeps what it finished
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['card']:<28} {r['model']:<12} {r['policy']:<24} {r['latency_s']:>8.3f} s "
                      f"speedup {r['speedup']:>6.3f}  ideal {r['ideal_speedup']:>6.3f}", flush=True)
        rows += model_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return 0 if all(math.isfinite(r["latency_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
