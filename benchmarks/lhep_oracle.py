"""How well LHEP's energy proxy finds the tokens that change the image (demo model).

    python -m benchmarks.lhep_oracle [--weights demo/weights] [--prompts 16] [--seeds 2] [--scales 3] [--json]
    python -m benchmarks.lhep_oracle --prune [--count-factor 2 ...] [--json]

The paper's ideal redundancy score of a region is the pixel change it causes; LHEP estimates it
from the Haar energy of the previous residual without decoding. Here the ideal is computed: for
held-out captions x seeds, the unpruned generation, then for each of the last ``--scales`` scales k
and every token t of it, the oracle score ||Dec(F) - Dec(F - Up(R_k masked to t))||^2, the pixel
change of removing that token's residual with the later scales as sampled (what zero fill does to a
skipped token, before the later scales react). Scorers rank the same tokens: LHEP's energy of
R_{k-1} with the paper's 3x3 average (``always``) and without (``never``), FastVAR's distance of
the scale's inputs from their mean, random, and the oracle itself (the ceiling). Per scale and
scorer: the share of the summed oracle score held by its top 25 % and 50 % of tokens, the Spearman
correlation, and for the energy scorers the fraction of tokens the rho = 0.5 threshold keeps and
the share those hold. One JSON line per (scale, scorer) with ``--json``.

``--prune`` generates instead: the same images pruned with LHEP's choice of tokens, the oracle's and
a random one, all at LHEP's token counts (and at ``--count-factor`` times them), to tell whether a
loss comes from which tokens are kept or from how many (``oracle_pruning``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from model_loader.generate import next_scale_input
from model_loader.sampling import SamplingParams
from model_loader.vae import bits_to_codes, resize_codes, tokens_to_vae_bits
from pruning.config import PruningConfig
from pruning.loop import generate
from pruning.policy import LDPruning, NoPruning, ScaleContext, ScaleObservation, ScalePlan
from pruning.scoring import distance_from_mean, lhep_energy, select_by_cumulative_energy, select_top_k

FRACTIONS = (0.25, 0.5)


def share_of_top(score_L: torch.Tensor, oracle_L: torch.Tensor, count: int) -> float:
    """Share of the summed oracle score held by the ``count`` highest-scored tokens."""
    top = torch.argsort(score_L, descending=True, stable=True)[:count]
    return float(oracle_L[top].sum() / oracle_L.sum().clamp_min(1e-12))


def spearman(a_L: torch.Tensor, b_L: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(x)).double() for x in (a_L, b_L))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1].nan_to_num(0.0))


@torch.inference_mode()
def oracle_scores(vae, summed_1Dhw: torch.Tensor, residual_Dhw: torch.Tensor, final_hw: tuple[int, int],
                  vae_scale: int, chunk: int = 64) -> torch.Tensor:
    """Per token of the residual's scale (h*w,): squared pixel change of the decoded image when that
    token's residual (its vae_scale x vae_scale block of codes) is removed from ``summed``."""
    _, h, w = residual_Dhw.shape
    th, tw = h // vae_scale, w // vae_scale
    ref = vae.decode(summed_1Dhw).float()
    out = torch.empty(th * tw)
    eye = torch.eye(th * tw, device=residual_Dhw.device).view(th * tw, 1, th, tw)
    for i in range(0, th * tw, chunk):
        m = eye[i:i + chunk]
        if vae_scale > 1:
            m = m.repeat_interleave(vae_scale, -2).repeat_interleave(vae_scale, -1)
        delta = residual_Dhw[None] * m
        if (h, w) != final_hw:
            delta = resize_codes(delta, final_hw)
        img = vae.decode(summed_1Dhw - delta).float()
        out[i:i + chunk] = ((img - ref) ** 2).sum(dim=(1, 2, 3)).cpu()
    return out


def measure(engine, captions: list[str], params: list[SamplingParams], grids, scales: int,
            seed: int = 0) -> list[dict]:
    model, preset = engine.model, engine.preset
    vs, patchify = preset.vae_scale, preset.spatial_patchify
    text, _ = engine.encode(captions)
    out = generate(model, text, grids, params, [NoPruning() for _ in params])
    final = (grids[-1][0] * vs, grids[-1][1] * vs)
    codes = [bits_to_codes(tokens_to_vae_bits(bits, g, patchify)).float() for bits, g in
             zip(out.bits_per_scale, grids, strict=True)]  # per scale (B, D, h', w')
    summed = out.summed_codes_BDhw.to(model.device)
    gen = torch.Generator().manual_seed(seed)
    acc: dict[tuple[int, str], dict[str, list[float]]] = {}
    for si in range(len(grids) - scales, len(grids)):
        grid = grids[si]
        length = grid[0] * grid[1]
        partial = sum(resize_codes(codes[j], final) if codes[j].shape[-2:] != final else codes[j] for j in range(si))
        inputs_BLd = next_scale_input(partial.to(model.device), grid, vs, patchify)
        for b in range(len(params)):
            oracle = oracle_scores(model.vae, summed[b:b + 1], codes[si][b].to(model.device), final, vs)
            prev = codes[si - 1][b]
            scorers = {"oracle": oracle, "lhep smoothed (paper)": lhep_energy(prev, grid, smooth="always"),
                       "lhep unsmoothed": lhep_energy(prev, grid, smooth="never"),
                       "fastvar distance": distance_from_mean(inputs_BLd[b]).cpu(),
                       "random": torch.rand(length, generator=gen)}
            for name, s in scorers.items():
                row = acc.setdefault((si, name), {})
                for f in FRACTIONS:
                    row.setdefault(f"share_top_{int(f * 100)}", []).append(share_of_top(s, oracle, round(f * length)))
                row.setdefault("spearman", []).append(spearman(s, oracle))
                if name.startswith("lhep"):
                    kept = select_by_cumulative_energy(s, 0.5).numel()
                    row.setdefault("rho05_keep_fraction", []).append(kept / length)
                    row.setdefault("rho05_share", []).append(share_of_top(s, oracle, kept))
                if name == "oracle":  # how concentrated the pixel change is
                    c = oracle.sort(descending=True).values.cumsum(0) / oracle.sum().clamp_min(1e-12)
                    row.setdefault("tokens_for_90pct", []).append((int((c < 0.9).sum()) + 1) / length)
    return [{"scale": si, "grid": list(grids[si]), "scorer": name, "images": len(params),
             **{k: round(statistics.mean(v), 4) for k, v in row.items()}} for (si, name), row in acc.items()]


class GivenKeep:
    """A pruning policy that computes, at the scales given, exactly the tokens given (per scale, a
    sorted index tensor), skipped tokens adding nothing (zero fill, the default's); both branches run."""

    name = "given-keep"

    def __init__(self, keep_per_scale: dict[int, torch.Tensor]) -> None:
        self.keep_per_scale = keep_per_scale

    def reset(self, grids: tuple[tuple[int, int], ...]) -> None:
        pass

    def plan(self, ctx: ScaleContext) -> ScalePlan:
        keep = self.keep_per_scale.get(ctx.scale_idx)
        if keep is None or keep.numel() == ctx.num_tokens:
            return ScalePlan()
        return ScalePlan(keep_idx_K=keep, zero_fill=True)

    def observe(self, ctx: ScaleContext, obs: ScaleObservation) -> None:
        pass


@torch.inference_mode()
def oracle_pruning(engine, captions: list[str], scenes: list, params: list[SamplingParams], grids,
                   count_factors: tuple[float, ...] = (1.0,), seed: int = 0) -> list[dict]:
    """LHEP's selection against the ideal one at the same token counts (SATS off, zero fill).

    The counts are what LHEP keeps at each of its scales (per image, ``PruningConfig(sats=False)``),
    times each of ``count_factors``. The oracle selection is made scale by scale on the trajectory it
    produces: at each LHEP scale in order, the generation with the earlier scales already pruned as
    chosen and this scale and the later ones computed in full; this scale's tokens are ranked by the
    pixel change of removing their residual (``oracle_scores``) and the top ones kept. A random
    selection at the same counts is the floor. Rows: PSNR / SSIM against the unpruned image of the
    same seed, adherence and its paired change, and the kept fraction per LHEP scale."""
    from benchmarks.quality import paired_change, psnr, ssim
    from demo.checker import score

    model, preset = engine.model, engine.preset
    vs, patchify = preset.vae_scale, preset.spatial_patchify
    final = (grids[-1][0] * vs, grids[-1][1] * vs)
    text, _ = engine.encode(captions)
    n = len(params)

    def run(policies):
        return generate(model, text, grids, params, policies)

    def residual(out, si: int, b: int) -> torch.Tensor:  # scale si was computed in full on ``out``
        return bits_to_codes(tokens_to_vae_bits(out.bits_per_scale[si][b:b + 1], grids[si], patchify))[0].float()

    base = run([NoPruning() for _ in params])
    cfg = PruningConfig(sats=False)
    lhep = sorted(cfg.lhep_set(tuple(grids)))
    energy = run([LDPruning(cfg) for _ in params])
    counts = [{si: energy.stats[b].scales[si].tokens_computed for si in lhep} for b in range(n)]
    gen = torch.Generator().manual_seed(seed)
    outs: dict[str, object] = {"lhep energy": energy}
    keeps: dict[str, list[dict[int, torch.Tensor]]] = {}
    for f in count_factors:
        tag = "" if f == 1.0 else f", {f:g}x tokens"
        want = [{si: min(round(c[si] * f), grids[si][0] * grids[si][1]) for si in lhep} for c in counts]
        oracle_keep: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]
        for si in lhep:  # the trajectory with the earlier scales pruned as chosen, this one in full
            traj = base if si == lhep[0] else run([GivenKeep(dict(k)) for k in oracle_keep])
            summed = traj.summed_codes_BDhw.to(model.device)
            for b in range(n):
                res = residual(traj, si, b)
                sc = oracle_scores(model.vae, summed[b:b + 1], res.to(model.device), final, vs)
                oracle_keep[b][si] = select_top_k(sc, want[b][si])
        keeps[f"oracle{tag}"] = oracle_keep
        keeps[f"random{tag}"] = [{si: select_top_k(torch.rand(grids[si][0] * grids[si][1], generator=gen), w[si])
                                  for si in lhep} for w in want]
    for name, k in keeps.items():
        outs[name] = run([GivenKeep(kb) for kb in k])
    base_imgs = [im.numpy() for im in base.images_BHW3]
    base_adh = np.array([score(im, sc)["adherence"] for im, sc in zip(base_imgs, scenes, strict=True)])
    rows = [{"selection": "unpruned", "images": n, "adherence": round(float(base_adh.mean()), 4)}]
    for name, out in outs.items():
        imgs = [im.numpy() for im in out.images_BHW3]
        pairs = list(zip(imgs, base_imgs, strict=True))
        adh = np.array([score(im, sc)["adherence"] for im, sc in zip(imgs, scenes, strict=True)])
        delta, delta_se = paired_change(adh, base_adh)
        rows.append({"selection": name, "images": n,
                     "kept_fraction": {str(si): round(statistics.mean(s.scales[si].kept_fraction for s in out.stats), 4)
                                       for si in lhep},
                     "ideal_speedup": round(statistics.median(s.ideal_speedup for s in out.stats), 3),
                     "psnr_db": round(statistics.mean(min(psnr(a, b), 99.0) for a, b in pairs), 2),
                     "ssim": round(statistics.mean(ssim(a, b) for a, b in pairs), 4),
                     "adherence": round(float(adh.mean()), 4),
                     "adherence_delta": round(delta, 4), "adherence_delta_se": round(delta_se, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=Path("demo/weights"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--scales", type=int, default=3, help="the last N scales (LHEP's candidates)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prune", action="store_true",
                    help="instead: generate with LHEP's selection, the oracle's and a random one at LHEP's counts")
    ap.add_argument("--count-factor", type=float, action="append", default=[], metavar="F",
                    help="--prune: also the oracle and random selections at F times LHEP's counts (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from demo.dataset import make_split
    from demo.model import load_demo_engine
    from model_loader.schedules import scale_schedule

    engine = load_demo_engine(args.weights)
    grids = scale_schedule(1.0, engine.preset.pn)
    if not 1 <= args.scales < len(grids):
        raise SystemExit(f"--scales must be in [1, {len(grids) - 1}] on this {len(grids)}-scale schedule")
    samples = make_split(args.prompts, seed=2026, split="heldout")  # benchmarks.quality's captions
    captions = [s.caption for s in samples for _ in range(args.seeds)]
    params = [SamplingParams(cfg=engine.preset.sampling.cfg, tau=engine.preset.sampling.tau, seed=k)
              for _ in samples for k in range(args.seeds)]
    if args.prune:
        scenes = [s.attributes for s in samples for _ in range(args.seeds)]
        factors = (1.0, *[f for f in args.count_factor if f != 1.0])
        for r in oracle_pruning(engine, captions, scenes, params, grids, factors):
            print(json.dumps(r) if args.json else
                  f"{r['selection']:<26} adherence {r['adherence']:.3f}" + ("" if "psnr_db" not in r else
                  f" ({r['adherence_delta']:+.3f} +- {r['adherence_delta_se']:.3f})  PSNR {r['psnr_db']:.2f} dB  "
                  f"SSIM {r['ssim']:.3f}  ideal {r['ideal_speedup']:.2f}x  kept {r['kept_fraction']}"))
        return 0
    for r in measure(engine, captions, params, grids, args.scales):
        print(json.dumps(r) if args.json else
              f"scale {r['scale']} {r['grid'][0]}x{r['grid'][1]}  {r['scorer']:<22} top 25%: {r['share_top_25']:.3f}  "
              f"top 50%: {r['share_top_50']:.3f}  spearman {r['spearman']:+.3f}"
              + (f"  rho 0.5 keeps {r['rho05_keep_fraction']:.3f} holding {r['rho05_share']:.3f}"
                 if "rho05_share" in r else "")
              + (f"  90% of the change in {r['tokens_for_90pct']:.3f} of tokens" if "tokens_for_90pct" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
