"""Gates of the demo recipe: how well the VAE reconstructs, and how well the whole model follows prompts.

    python -m demo.evaluate vae <dir or vae.safetensors> [--n 64]
    python -m demo.evaluate model <weights dir> [--n 64]
    python -m demo.evaluate teacher <weights dir> [--n 64] [--figure scales.png]
    python -m demo.evaluate text <weights dir> [--steps 3000] [--references]

``vae``: held-out images through encoder, the 7-scale quantizer and decoder; PSNR against the
128-px target and the checker's adherence on the reconstructions (an upper bound for the full
model: the transformer can only predict these codes). ``model``: one image per held-out caption
(seed = index) from the unpruned engine at the preset's sampling defaults; the checker's adherence.
``text``: the binding probe of ``demo.text_probe`` on the text encoder. All print one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from model_loader.schedules import scale_schedule
from model_loader.vae import BSQVAE, bits_to_codes, image_to_uint8, resize_codes, tokens_to_vae_bits

from .checker import mean_scores
from .dataset import batch_tensors, make_split
from .preset import DEMO_PRESET

EVAL_SEED = 0


def load_vae(path: str | Path) -> BSQVAE:
    """The demo VAE from a weights folder or a vae.safetensors file (frozen, eval mode)."""
    from .train_transformer import load_frozen_vae

    p = Path(path)
    return load_frozen_vae(p / "vae.safetensors" if p.is_dir() else p, DEMO_PRESET.vae)


@torch.no_grad()
def vae_report(vae: BSQVAE, n: int = 64, batch: int = 16, device: str = "cpu") -> dict[str, float]:
    """Reconstruction PSNR (dB, images in [-1, 1]) and checker scores on ``n`` held-out images."""
    samples = make_split(n, EVAL_SEED, "heldout")
    grids = list(scale_schedule(1.0, DEMO_PRESET.pn))
    mse, images = [], []
    vae = vae.to(device)
    for i in range(0, n, batch):
        x_B3HW, _ = batch_tensors(samples[i:i + batch])
        x_B3HW = x_B3HW.to(device)
        f_hat, _ = vae.quantize_multiscale(vae.encode(x_B3HW), grids)
        rec_B3HW = vae.decode(f_hat)
        mse += ((rec_B3HW - x_B3HW) ** 2).mean(dim=(1, 2, 3)).tolist()
        images += [im.cpu().numpy() for im in image_to_uint8(rec_B3HW)]
    psnr = float(np.mean([10 * math.log10(4.0 / max(m, 1e-12)) for m in mse]))
    return {"images": n, "psnr_db": round(psnr, 2), **mean_scores(images, [s.attributes for s in samples])}


def model_report(weights_dir: str | Path, n: int = 64, batch: int = 8, device: str = "cpu",
                 split: str = "heldout", cfg: float | None = None, tau: float | None = None,
                 start: int = 0, top_p: float | None = None) -> dict[str, float]:
    """Unpruned adherence of the full demo model on ``n`` captions of ``split`` (held-out by default),
    at the preset's sampling defaults unless ``cfg``/``tau``/``top_p`` are given; captions
    ``start .. start+n-1`` with seed = caption index."""
    from model_loader.sampling import SamplingParams
    from pruning.engine import ImageRequest, grids_for

    from .model import load_demo_engine

    engine = load_demo_engine(weights_dir, device=device)
    d = DEMO_PRESET.sampling
    cfg, tau = (d.cfg if cfg is None else cfg), (d.tau if tau is None else tau)
    top_p = d.top_p if top_p is None else top_p
    samples = make_split(n, EVAL_SEED, split, start=start)
    grids = grids_for(1.0, DEMO_PRESET.pn)
    images = []
    for i in range(0, n, batch):
        reqs = [ImageRequest(s.caption, SamplingParams(cfg=cfg, tau=tau, top_k=d.top_k, top_p=top_p,
                                                       seed=start + i + j))
                for j, s in enumerate(samples[i:i + batch])]
        images += [r.image_HW3.cpu().numpy() for r in engine.generate(reqs, grids)]
    return {"images": n, "start": start, "split": split, "cfg": cfg, "tau": tau, "top_p": top_p,
            **mean_scores(images, [s.attributes for s in samples])}


def sum_scale_codes(bits_per_scale: list[torch.Tensor], grids) -> torch.Tensor:
    """Bits of every scale (B, h, w, D) -> the code sum at the final grid (B, D, H, W), as the
    quantizer's ``f_hat`` and the generation loop build it."""
    final = tuple(grids[-1])
    total_BDhw = None
    for bits_BhwD in bits_per_scale:
        q = resize_codes(bits_to_codes(bits_BhwD), final)
        total_BDhw = q if total_BDhw is None else total_BDhw + q
    return total_BDhw


@torch.no_grad()
def teacher_report(weights_dir: str | Path, n: int = 64, batch: int = 8, split: str = "heldout",
                   figure: str | Path | None = None) -> dict:
    """Teacher-forced diagnosis of the demo transformer on ``n`` captions of ``split`` (see the
    module docstring); ``figure``: also write the per-scale cumulative decode of the first 8 images."""
    from model_loader.checkpoint_io import read_safetensors
    from model_loader.layers import rope_tables
    from model_loader.schedules import rope_positions
    from model_loader.transformer import InfinityTransformer

    from .model import demo_text_encoder_dir
    from .train_transformer import demo_text_encoder, teacher_forcing_from_latent

    root = Path(weights_dir)
    cfg = DEMO_PRESET.transformer
    vae = load_vae(root)
    tf = InfinityTransformer(cfg)
    tf.load_state_dict({k: v.float() if v.is_floating_point() else v
                        for k, v in read_safetensors(root / "transformer.safetensors").items()})
    tf.eval()
    enc = demo_text_encoder(demo_text_encoder_dir(root), cfg.text_maxlen)
    grids = list(scale_schedule(1.0, DEMO_PRESET.pn))
    sizes = [h * w for h, w in grids]
    rope = rope_tables(cfg.head_dim, rope_positions(tuple(grids)))
    samples = make_split(n, EVAL_SEED, split)
    variants = ["vae", "model_all", *(f"model_scale{k}" for k in range(len(grids)))]
    images: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    correct_S = torch.zeros(len(grids), dtype=torch.float64)
    cumulative = []
    for i in range(0, n, batch):
        x_B3HW, captions = batch_tensors(samples[i:i + batch])
        z_BDhw = vae.encode(x_B3HW)
        x_BLd, labels_BLD = teacher_forcing_from_latent(vae, z_BDhw, grids)
        logits_BLV = tf.forward_train(enc.encode(captions), x_BLd, grids, rope)
        pred_BLD = logits_BLV.view(*labels_BLD.shape, 2).argmax(-1)
        correct_S += torch.stack([c.double().mean(dim=(1, 2)).sum() for c in
                                  (pred_BLD == labels_BLD).split(sizes, dim=1)])
        true, pred = ([tokens_to_vae_bits(t, g, False) for t, g in zip(b.split(sizes, 1), grids, strict=True)]
                      for b in (labels_BLD, pred_BLD))
        sets = {"vae": true, "model_all": pred,
                **{f"model_scale{k}": true[:k] + [pred[k]] + true[k + 1:] for k in range(len(grids))}}
        for name, bits in sets.items():
            images[name] += [im.numpy() for im in image_to_uint8(vae.decode(sum_scale_codes(bits, grids)))]
        if figure is not None and len(cumulative) < 8:  # a row per image: decoded after scale 0, 1, ...
            steps = [image_to_uint8(vae.decode(sum_scale_codes(true[:k + 1], grids))).numpy()
                     for k in range(len(grids))]
            rows = [np.concatenate([s[r] for s in steps], axis=1) for r in range(len(true[0]))]
            cumulative += rows[:8 - len(cumulative)]
    if figure is not None:
        from PIL import Image

        # a 256-colour palette: a third of the bytes (the noisy first columns barely compress)
        Image.fromarray(np.concatenate(cumulative, axis=0)).quantize(256).save(figure, optimize=True)
    scenes = [s.attributes for s in samples]
    return {"images": n, "split": split, "grids": [list(g) for g in grids],
            "bit_accuracy_per_scale": [round(float(a) / n, 4) for a in correct_S],
            "adherence": {v: mean_scores(images[v], scenes) for v in variants}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("vae", "model", "teacher", "text"))
    p.add_argument("path", type=Path)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout", help="model, teacher: which captions")
    p.add_argument("--figure", type=Path, help="teacher: PNG of the cumulative decode after each scale")
    p.add_argument("--start", type=int, default=0, help="model: first caption index")
    p.add_argument("--cfg", type=float, help="model: guidance scale (default: the preset's)")
    p.add_argument("--tau", type=float, help="model: sampling temperature (default: the preset's)")
    p.add_argument("--top-p", type=float, help="model: nucleus threshold on bit pairs (default: the preset's)")
    p.add_argument("--steps", type=int, default=3000, help="text: training steps of the probe's reader")
    p.add_argument("--references", action="store_true",
                   help="text: also probe the bag-of-words and absolute-position reference features")
    a = p.parse_args(argv)
    if a.what == "vae":
        report = vae_report(load_vae(a.path), a.n, device=a.device)
    elif a.what == "text":
        from model_loader.text_encoder import T5TextEncoder

        from .text_probe import probe_report
        enc = T5TextEncoder(a.path / "text_encoder", device=a.device, dtype=torch.float32,
                            max_length=DEMO_PRESET.transformer.text_maxlen)
        report = probe_report(enc, steps=a.steps, references=a.references)
    elif a.what == "teacher":
        report = teacher_report(a.path, a.n, split=a.split, figure=a.figure)
    else:
        report = model_report(a.path, a.n, device=a.device, split=a.split, cfg=a.cfg, tau=a.tau, start=a.start,
                              top_p=a.top_p)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
