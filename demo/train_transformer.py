"""Train the demo Infinity transformer: bitwise cross-entropy with teacher forcing on all 7 scales.

Labels are the bits of the frozen VAE's multi-scale quantizer. The input of scale k (k >= 1) is
built exactly as ``model_loader.generate`` builds it from sampled bits: the codes of scales
< k summed at the final grid (each upsampled bilinearly), resized to grid k by
``next_scale_input``. The text goes through the frozen demo tiny T5; with probability
``cond_drop`` a row's text is replaced by the model's learned ``cfg_uncond`` rows (what the
unconditional branch of classifier-free guidance feeds), so guidance works at inference.
With ``flip_max`` > 0, bitwise self-correction (the Infinity paper's remedy for the gap between
teacher forcing and sampling): each row draws a flip probability uniformly from [0, flip_max],
the bits it feeds forward at every scale are flipped with that probability, and the residual
(hence the labels) of every later scale is quantized from the flipped sum, so later scales learn
to correct earlier mistakes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_loader.checkpoint_io import read_safetensors
from model_loader.configs import TransformerConfig, VAEConfig
from model_loader.generate import next_scale_input
from model_loader.layers import rope_tables
from model_loader.schedules import rope_positions
from model_loader.text_cond import TextCond
from model_loader.text_encoder import T5TextEncoder
from model_loader.transformer import InfinityTransformer
from model_loader.vae import BSQVAE, bits_to_codes, resize_codes, vae_bits_to_tokens

from .preset import DEMO_PRESET, build_demo_text_encoder
from .train_common import (
    BackgroundBatches,
    ReplayBuffer,
    RunLog,
    StepProfiler,
    StopOnSignal,
    TimeBudget,
    TrainArgs,
    check_finite,
    make_optimizer,
    optimizer_step,
    save_run,
    seed_everything,
    train_batches,
)
from .train_vae import SCHEDULE

logger = logging.getLogger(__name__)

CHECKPOINT = "transformer.ckpt"
"""``<out>/transformer.ckpt``: weights, AdamW state, the next step, the generators and the settings,
written with every save of a run, so ``resume=True`` continues its schedule where it stopped."""


def load_frozen_vae(path: str | Path, cfg: VAEConfig) -> BSQVAE:
    vae = BSQVAE(cfg)
    vae.load_state_dict(read_safetensors(Path(path)))
    return vae.eval().requires_grad_(False)


def demo_text_encoder(folder: Path, max_length: int, device: str = "cpu") -> T5TextEncoder:
    """The demo tiny T5 from ``folder``, built there first if absent (float32 on any device)."""
    if not (folder / "config.json").is_file():
        build_demo_text_encoder(folder)
    return T5TextEncoder(folder, device=device, dtype=torch.float32, max_length=max_length, pad_to_max_length=False)


@torch.no_grad()
def init_for_training_(tf: InfinityTransformer, seed: int) -> InfinityTransformer:
    """Seeded init: linear/embedding weights N(0, 1/(3C)) (trunc at 2 std), zero biases, small head.

    The attention log-scales, norm weights and ``ada_gss`` keep their constructor values.
    """
    gen = torch.Generator().manual_seed(seed)
    std = math.sqrt(1.0 / (3 * tf.cfg.embed_dim))

    def normal_(p: torch.Tensor, s: float) -> None:
        p.copy_((torch.randn(p.shape, generator=gen) * s).clamp(-2 * s, 2 * s))

    for m in tf.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            normal_(m.weight, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    for name in ("pos_start", "cfg_uncond"):
        normal_(getattr(tf, name), std if name == "pos_start" else 1.0)
    normal_(tf.text_proj_for_sos.ca.mat_q, std)
    tf.head.weight.mul_(0.1)
    return tf


def build_transformer_for_training(cfg: TransformerConfig, seed: int) -> InfinityTransformer:
    return init_for_training_(InfinityTransformer(cfg), seed).train()


@torch.no_grad()
def teacher_forcing_batch(vae: BSQVAE, img_B3HW: torch.Tensor, grids, flip_B: torch.Tensor | None = None,
                          gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of scales 1..K-1 (B, L - 1, D) float32, bit labels of all scales (B, L, D) int64).

    ``flip_B`` (B,) is each row's bit-flip probability for bitwise self-correction (None: none,
    which is exactly the VAE's ``quantize_multiscale``); ``gen`` draws the flips.
    """
    return teacher_forcing_from_latent(vae, vae.encode(img_B3HW), grids, flip_B, gen)


@torch.no_grad()
def teacher_forcing_from_latent(vae: BSQVAE, z_BDhw: torch.Tensor, grids, flip_B: torch.Tensor | None = None,
                                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``teacher_forcing_batch`` from the VAE encoder's latents (what the replay buffer keeps)."""
    if flip_B is None:
        _, bits = vae.quantize_multiscale(z_BDhw, list(grids))
        fed = bits
    else:
        bits, fed = quantize_with_flips(z_BDhw, grids, flip_B, gen)
    labels_BLD = torch.cat([vae_bits_to_tokens(b_BhwD, False) for b_BhwD in bits], dim=1).long()
    final = tuple(grids[-1])
    summed_BDhw = torch.zeros_like(z_BDhw)
    feats = []
    for si in range(len(grids) - 1):
        summed_BDhw += resize_codes(bits_to_codes(fed[si]), final)
        feats.append(next_scale_input(summed_BDhw, grids[si + 1], 1, False))
    return torch.cat(feats, dim=1), labels_BLD


def quantize_with_flips(z_BDhw: torch.Tensor, grids, flip_B: torch.Tensor,
                        gen: torch.Generator | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Multi-scale residual BSQ where each scale's bits are flipped (row b with probability
    ``flip_B[b]``) before they are subtracted: (label bits, fed bits) per scale, (B, h, w, D) uint8.

    Labels of scale k quantize the residual left by the *fed* bits of scales < k, as sampling
    would leave it; with every probability 0 both lists equal ``BSQVAE.quantize_multiscale``'s bits.
    """
    residual = z_BDhw.float()
    full = tuple(residual.shape[-2:])
    labels, fed = [], []
    for grid in grids:
        r = residual if tuple(grid) == full else F.interpolate(residual, size=tuple(grid), mode="area")
        bits_BhwD = (r.permute(0, 2, 3, 1) > 0).to(torch.uint8)  # sign of the normalised residual
        noise = torch.rand(bits_BhwD.shape, generator=gen, device="cpu" if gen is None else gen.device)
        flip = noise.to(bits_BhwD.device) < flip_B.to(bits_BhwD.device)[:, None, None, None]
        used_BhwD = bits_BhwD ^ flip.to(torch.uint8)
        labels.append(bits_BhwD)
        fed.append(used_BhwD)
        q = bits_to_codes(used_BhwD)
        residual = residual - (q if tuple(grid) == full else resize_codes(q, full))
    return labels, fed


def drop_text(tf: InfinityTransformer, text: TextCond, drop_B: torch.Tensor) -> TextCond:
    """Rows where ``drop_B`` is set get the learned unconditional text (keeping their length)."""
    unc = tf.uncond_text(text.lens_B).features_BTC
    feats = torch.where(drop_B[:, None, None], unc, text.features_BTC)
    return TextCond(feats, text.lens_B)


def bitwise_loss(logits_BLV: torch.Tensor, labels_BLD: torch.Tensor, scale_sizes: list[int] | None = None,
                 last_scale_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bitwise cross-entropy and the per-token bit accuracy (B, L).

    Without ``scale_sizes`` the mean over every bit of every token; with them the mean over
    scales of each scale's mean, so the 1x1 scale that fixes the background (1 token of 521)
    weighs as much as the 16x16 one (256 tokens). ``last_scale_weight`` (with ``scale_sizes``)
    weighs the last scale's mean that many times as much as any other's (a weighted mean): the
    demo's shapes are decided there alone (``demo.evaluate teacher``).
    """
    logits_BLD2 = logits_BLV.view(*labels_BLD.shape, 2)
    ce_BLD = F.cross_entropy(logits_BLD2.reshape(-1, 2), labels_BLD.reshape(-1), reduction="none")
    ce_BL = ce_BLD.view(labels_BLD.shape).mean(-1)
    if scale_sizes is None:
        loss = ce_BL.mean()
    else:
        per_scale = torch.stack([c.mean() for c in ce_BL.split(scale_sizes, dim=1)])
        w = torch.ones_like(per_scale)
        w[-1] = last_scale_weight
        loss = (per_scale * w).sum() / w.sum()
    acc_BL = (logits_BLD2.argmax(-1) == labels_BLD).float().mean(-1)
    return loss, acc_BL


def train_transformer(args: TrainArgs, vae_path: str | Path, *, cfg: TransformerConfig = DEMO_PRESET.transformer,
                      vae_cfg: VAEConfig = DEMO_PRESET.vae, cond_drop: float = 0.1,
                      text_encoder_dir: Path | None = None, per_scale_loss: bool = False,
                      init: str | Path | None = None, stop_after: int | None = None,
                      flip_max: float = 0.0, replay: int = 0, amp: str | None = None,
                      last_scale_weight: float = 1.0, profile: Path | None = None,
                      resume: bool = False) -> InfinityTransformer:
    """Writes ``<out>/transformer.safetensors``, ``transformer.json`` and ``<out>/transformer.ckpt``
    (``CHECKPOINT``) with every save (``args.save_every``) and at the end.

    ``resume=True`` continues the run saved in ``args.out`` from its checkpoint: same weights,
    optimizer state, generators and LR schedule (its step count, fitted or not), from the step after
    the last one saved, with the same batches (the train stream is indexed by step), so a run split
    at a save ends where the unsplit run ends (bit for bit on a CPU; a replay buffer starts empty).
    Every training setting (LR, batch, seeds, losses, the VAE's and T5's files, ...) must equal the
    checkpoint's; ``args.minutes`` then only bounds this part's wall time (stop and save, no refit).
    A first SIGINT / SIGTERM stops the run after its step and saves it (``StopOnSignal``).

    ``replay`` > 0 keeps that many encoded images in a ``ReplayBuffer`` on the device: each step
    takes the batches rendered since the last step (fresh rows first) and fills the rest from the
    buffer, so a GPU is not held to the renderers' pace (runs are then not reproducible: what is
    fresh depends on timing). ``amp="bf16"``: the forward and loss under bfloat16 autocast
    (float32 weights and optimizer). ``profile``: a ``StepProfiler`` table of steps 25-29 written
    there (phases: data, teacher_forcing, text, forward_loss, backward_step).
    """
    if amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    if last_scale_weight != 1.0 and not per_scale_loss:
        raise ValueError("last_scale_weight needs per_scale_loss (it weighs per-scale means)")
    if last_scale_weight <= 0:
        raise ValueError(f"last_scale_weight must be > 0, got {last_scale_weight}")
    if resume and init is not None:
        raise ValueError("init and resume exclude each other (resume continues the checkpoint's own weights)")
    seed_everything(args.seed)
    grids = SCHEDULE
    dev = torch.device(args.device)
    text_dir = text_encoder_dir or args.out / "text_encoder"
    vae = load_frozen_vae(vae_path, vae_cfg).to(dev)
    enc = demo_text_encoder(text_dir, cfg.text_maxlen, args.device)
    if enc.d_model != cfg.text_channels:
        raise ValueError(f"text encoder d_model {enc.d_model} != text_channels {cfg.text_channels}")
    tf = build_transformer_for_training(cfg, args.seed)
    if init is not None:
        tf.load_state_dict(read_safetensors(Path(init)))
        logger.info("initialised the transformer from %s", init)
    args = replace(args, extra={**args.extra, "vae": str(vae_path), "cond_drop": cond_drop,
                                "per_scale_loss": per_scale_loss, "init": str(init) if init else None,
                                "stop_after": stop_after, "flip_max": flip_max, "replay": replay, "amp": amp,
                                "last_scale_weight": last_scale_weight})
    settings = training_settings(args, cfg, vae_path, text_dir)
    ckpt = load_checkpoint(args.out / CHECKPOINT, settings) if resume else None
    if ckpt is not None:
        tf.load_state_dict(ckpt["model"])
        args = replace(args, steps=ckpt["steps"], extra={**args.extra,
                                                         "resumed_at": [*ckpt["resumed_at"], ckpt["step"]]})
    tf.to(dev)
    rope = rope_tables(cfg.head_dim, rope_positions(tuple(grids))).to(dev)
    sizes = [h * w for h, w in grids]
    opt = make_optimizer(tf, args.lr, args.weight_decay)
    # flips and text drops drawn where they are used (the CPU generator on a CPU, as every CPU run had)
    gen = torch.Generator(dev).manual_seed(args.seed + 1) if dev.type == "cuda" else \
        torch.Generator().manual_seed(args.seed + 1)
    replay_gen = torch.Generator().manual_seed(args.seed + 2)
    log = RunLog(args)
    start = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"])
        replay_gen.set_state(ckpt["replay_gen"])
        log.history = json.loads(ckpt["history"])
        start = ckpt["step"]
        logger.info("resumed %s at step %d of %d", args.out / CHECKPOINT, start, args.steps)
    logger.info("transformer %s: %.2fM parameters, %d tokens per image", cfg,
                sum(p.numel() for p in tf.parameters()) / 1e6, sum(sizes))
    budget = TimeBudget(args.minutes, first_step=start, refit=ckpt is None)
    profiler = StepProfiler(profile, dev)
    phase = torch.profiler.record_function
    batches = train_batches(args.steps, args.batch_size, args.data_seed, args.workers, start=start)

    def save(next_step: int) -> None:
        save_run(tf, args.out, "transformer", cfg, args, log)
        save_checkpoint(args.out / CHECKPOINT, tf, opt, next_step=next_step, steps=args.steps, settings=settings,
                        gen=gen, replay_gen=replay_gen, history=log.history,
                        resumed_at=args.extra.get("resumed_at", []))
    stream = BackgroundBatches(batches) if replay > 0 else None
    buffer: ReplayBuffer | None = None
    next_step = start
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    with StopOnSignal() as stop:
        try:
            for step in itertools.count(start):
                if step >= min(args.steps, stop_after or args.steps) or budget.over(step) or stop.requested:
                    break  # the schedule's end, --stop-after, the time budget, a signal
                profiler.before(step)
                with phase("data"):
                    if stream is None:
                        item = next(batches, None)
                        if item is None:
                            break
                        img_B3HW, captions = item
                        z_BDhw = vae.encode(img_B3HW.to(dev, non_blocking=True))
                    else:
                        fresh = []
                        for img_B3HW, caps in stream.ready(block=buffer is None):
                            z = vae.encode(img_B3HW.to(dev, non_blocking=True))
                            buffer = buffer or ReplayBuffer(replay, tuple(z.shape[1:]), dev)
                            fresh.append(buffer.add(z, caps))
                        if buffer is None:
                            break  # the stream ended before its first batch
                        z_BDhw, captions = buffer.take(buffer.batch(args.batch_size,
                                                                    torch.cat(fresh) if fresh else None, replay_gen))
                n = len(captions)
                with phase("teacher_forcing"):
                    flip_B = torch.rand(n, generator=gen, device=gen.device) * flip_max if flip_max > 0 else None
                    x_BLd, labels_BLD = teacher_forcing_from_latent(vae, z_BDhw, grids, flip_B, gen)
                with phase("text"):
                    drop_B = (torch.rand(n, generator=gen, device=gen.device) < cond_drop).to(dev)
                    text = drop_text(tf, enc.encode(captions).to(dev), drop_B)
                with phase("forward_loss"), autocast():
                    logits_BLV = tf.forward_train(text, x_BLd, grids, rope)
                    loss, acc_BL = bitwise_loss(logits_BLV, labels_BLD, sizes if per_scale_loss else None,
                                                last_scale_weight)
                acc_S = torch.stack([a.mean() for a in acc_BL.split(sizes, dim=1)])
                with phase("backward_step"):
                    norm = optimizer_step(tf, opt, loss, step, args, sync=False)
                # one sync a step
                row = torch.cat([loss.detach().float().view(1), acc_S.float(), norm.float().view(1)]).tolist()
                profiler.after(step)
                vals = {"loss": row[0], **{f"acc{si}": a for si, a in enumerate(row[1:-1])}, "grad_norm": row[-1]}
                check_finite(vals, step)
                log.record(step, **vals)
                args = budget.fit(step, args, log)
                next_step = step + 1
                if args.save_every and step and step % args.save_every == 0:
                    save(next_step)
        finally:
            profiler.close()
            if stream is not None:
                stream.close()
            batches.close()
    if buffer is not None:
        args = replace(args, extra={**args.extra, "replay_images_rendered": buffer.added,
                                    "replay_images_trained": len(log.history) * args.batch_size})
        log.args = args
        logger.info("replay: %d images rendered, %d rows trained", buffer.added, len(log.history) * args.batch_size)
    tf.eval()
    save(next_step)
    return tf


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def training_settings(args: TrainArgs, cfg: TransformerConfig, vae_path: str | Path, text_dir: Path) -> dict:
    """What a resumed run must share with the run it continues (JSON values): the optimisation and
    data settings, the losses, the model's config, and the VAE's and T5's files by content."""
    keys = ("batch_size", "lr", "seed", "data_seed", "warmup_frac", "min_lr_frac", "weight_decay", "grad_clip")
    extra = {k: v for k, v in args.extra.items() if k not in ("vae", "init", "stop_after", "resumed_at")}
    settings = {**{k: getattr(args, k) for k in keys}, **extra, "config": asdict(cfg),
                "vae_sha256": _file_digest([Path(vae_path)]),
                "text_encoder_sha256": _file_digest(sorted(p for p in Path(text_dir).rglob("*") if p.is_file()))}
    return json.loads(json.dumps(settings))


def save_checkpoint(path: Path, tf: nn.Module, opt: torch.optim.Optimizer, *, next_step: int, steps: int,
                    settings: dict, gen: torch.Generator, replay_gen: torch.Generator,
                    history: list[dict[str, float]], resumed_at: list[int]) -> Path:
    """Writes ``path`` atomically (a temporary file, then a rename), readable with ``weights_only``."""
    state = {"step": next_step, "steps": steps, "model": tf.state_dict(), "optimizer": opt.state_dict(),
             "gen": gen.get_state(), "replay_gen": replay_gen.get_state(), "settings": json.dumps(settings),
             "history": json.dumps(history), "resumed_at": list(resumed_at)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, settings: dict) -> dict:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``), checked against this run's
    ``settings``: a ValueError names the file and every setting that differs."""
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint {path} (a run writes one with every save and at its end)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(ckpt["settings"])
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {settings.get(k)!r}"
            for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if diff:
        raise ValueError(f"resume: {path} was trained with other settings; " + "; ".join(diff))
    if ckpt["step"] >= ckpt["steps"]:
        raise ValueError(f"resume: the run in {path} already ran all {ckpt['steps']} steps of its schedule")
    return ckpt
