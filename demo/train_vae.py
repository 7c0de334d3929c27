"""Train the demo BSQ VAE: L1 reconstruction through the 7-scale residual quantizer (STE) + commitment.

The quantizer is ``BSQVAE.quantize_multiscale`` itself, run on a detached latent; its output
reaches the decoder through a whole-latent straight-through estimator,
``z_q = z + (f_hat - z).detach()``, so the decoder trains on exactly the codes generation will
sum and the encoder gets the decoder's gradient unchanged. ``beta * ||z - f_hat||^2`` keeps the
latent near what the quantizer can represent. ``--crop`` trains on random square crops (a
cheaper first phase): the schedule is then the prefix of the full one ending at the crop's grid.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from model_loader.checkpoint_io import read_safetensors
from model_loader.configs import VAEConfig
from model_loader.schedules import scale_schedule
from model_loader.vae import BSQVAE

from .dataset import MODEL_IMAGE_SIZE
from .preset import DEMO_PRESET
from .train_common import (
    RunLog,
    TimeBudget,
    TrainArgs,
    make_optimizer,
    optimizer_step,
    save_run,
    seed_everything,
    train_batches,
)

logger = logging.getLogger(__name__)

SCHEDULE = scale_schedule(1.0, DEMO_PRESET.pn)


def crop_schedule(crop: int, patch: int) -> tuple[tuple[int, int], ...]:
    """Grids of the model's schedule up to the crop's latent grid (which must be one of them)."""
    side = crop // patch
    grids = tuple(g for g in SCHEDULE if g[0] <= side)
    if crop % patch or not grids or grids[-1] != (side, side):
        raise ValueError(f"crop {crop} must give a latent grid in {[g[0] for g in SCHEDULE]} (patch {patch})")
    return grids


def random_crop(img_B3HW: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    side = img_B3HW.shape[-1]
    if crop >= side:
        return img_B3HW
    out = []
    for img in img_B3HW:
        y, x = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=gen))
        out.append(img[:, y:y + crop, x:x + crop])
    return torch.stack(out)


def quantize_ste(vae: BSQVAE, z_BDhw: torch.Tensor, grids) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_q with straight-through gradient, f_hat detached) from the model's own multi-scale quantizer."""
    with torch.no_grad():
        f_hat_BDhw, _ = vae.quantize_multiscale(z_BDhw.detach(), list(grids))
    return z_BDhw + (f_hat_BDhw - z_BDhw).detach(), f_hat_BDhw


def foreground_weight(img_B3HW: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W): 1 + weight where a pixel is off the image's median colour (shapes, texture), else 1.

    Backgrounds cover most pixels, so a plain mean lets flat colour dominate the loss while the
    shapes the captions talk about stay blobs; this gives shape pixels ``1 + weight`` times the say.
    """
    med_B3 = img_B3HW.flatten(2).median(dim=2).values
    off_B1HW = (img_B3HW - med_B3[:, :, None, None]).abs().amax(dim=1, keepdim=True) > threshold
    return 1.0 + weight * off_B1HW.float()


def vae_loss(vae: BSQVAE, img_B3HW: torch.Tensor, grids, beta: float,
             shape_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    z_BDhw = vae.encode(img_B3HW)
    zq_BDhw, f_hat_BDhw = quantize_ste(vae, z_BDhw, grids)
    rec_B3HW = vae.decoder(zq_BDhw)
    err_B3HW = (rec_B3HW - img_B3HW).abs()
    if shape_weight > 0:
        w_B1HW = foreground_weight(img_B3HW, shape_weight)
        l1 = (err_B3HW * w_B1HW).sum() / (w_B1HW.sum() * 3)
    else:
        l1 = err_B3HW.mean()
    commit = F.mse_loss(z_BDhw, f_hat_BDhw)
    loss = l1 + beta * commit
    return loss, {"loss": loss.item(), "l1": l1.item(), "commit": commit.item()}


def train_vae(args: TrainArgs, cfg: VAEConfig = DEMO_PRESET.vae, *, crop: int = MODEL_IMAGE_SIZE, beta: float = 0.1,
              init: str | None = None, shape_weight: float = 0.0) -> BSQVAE:
    """Train (or, with ``init``, continue training) the VAE; writes ``<out>/vae.safetensors`` and ``vae.json``."""
    seed_everything(args.seed)
    vae = BSQVAE(cfg)
    if init is not None:
        vae.load_state_dict(read_safetensors(Path(init)))
        logger.info("initialised the VAE from %s", init)
    vae.to(args.device).train()
    grids = crop_schedule(crop, cfg.patch_size)
    args = replace(args, extra={**args.extra, "crop": crop, "beta": beta, "init": init, "grids": grids,
                                "shape_weight": shape_weight})
    opt = make_optimizer(vae, args.lr, args.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    log = RunLog(args)
    logger.info("VAE %s: %.2fM parameters, crop %d, grids %s", cfg, sum(p.numel() for p in vae.parameters()) / 1e6,
                crop, grids)
    budget = TimeBudget(args.minutes)
    batches = train_batches(args.steps, args.batch_size, args.data_seed, args.workers)
    for step, (img_B3HW, _) in enumerate(batches):
        if step >= args.steps or budget.over(step):  # a time budget may have shortened the run
            break
        img_B3HW = img_B3HW.to(args.device, non_blocking=True)
        loss, vals = vae_loss(vae, random_crop(img_B3HW, crop, gen), grids, beta, shape_weight)
        vals["grad_norm"] = optimizer_step(vae, opt, loss, step, args)
        log.record(step, **vals)
        args = budget.fit(step, args, log)
        if args.save_every and step and step % args.save_every == 0:
            save_run(vae, args.out, "vae", cfg, args, log)
    batches.close()
    vae.eval()
    save_run(vae, args.out, "vae", cfg, args, log)
    return vae
