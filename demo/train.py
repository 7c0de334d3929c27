"""CLI: ``python -m demo.train vae|transformer|text --out DIR --steps N [...]`` (see demo/README.md for the recipe)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from .train_common import TrainArgs

DEFAULTS = {"vae": {"lr": 1.5e-3, "batch_size": 8}, "transformer": {"lr": 5e-4, "batch_size": 8},
            "text": {"lr": 1e-3, "batch_size": 128}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__)
    p.add_argument("what", choices=("vae", "transformer", "text"))
    p.add_argument("--out", type=Path, required=True, help="weights folder (the demo preset's layout)")
    p.add_argument("--steps", type=int, help="the schedule's length (required, except with --resume)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda on a lent GPU (float32 weights either way; TF32 matmuls on cuda)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--workers", type=int, default=0, help="processes rendering batches ahead (a GPU needs ~14)")
    p.add_argument("--minutes", type=float,
                   help="wall-clock budget: --steps becomes an upper bound, fitted after 20 steps")
    g = p.add_argument_group("vae")
    g.add_argument("--crop", type=int, default=128, help="random square crops (64: a cheaper first phase)")
    g.add_argument("--beta", type=float, default=0.1, help="commitment weight")
    g.add_argument("--init", type=Path, help="continue from this vae.safetensors")
    g.add_argument("--shape-weight", type=float, default=4.0,
                   help="extra L1 weight of pixels off the image's median colour (0: plain L1)")
    g = p.add_argument_group("text (the tiny T5's pretraining, demo/train_text.py)")
    g.add_argument("--qk-scale", type=float, default=0.2,
                   help="scale of the seeded T5's query/key weights at the start")
    g = p.add_argument_group("transformer")
    g.add_argument("--vae", type=Path, help="trained vae.safetensors (default: <out>/vae.safetensors)")
    g.add_argument("--cond-drop", type=float, default=0.1, help="probability of the unconditional text")
    g.add_argument("--per-scale-loss", action="store_true", help="mean over scales of each scale's mean loss")
    g.add_argument("--init-transformer", type=Path, help="continue from this transformer.safetensors")
    g.add_argument("--last-scale-weight", type=float, default=1.0,
                   help="with --per-scale-loss: the last scale's loss counts this many times (shapes are decided "
                        "there: python -m demo.evaluate teacher)")
    g.add_argument("--flip-max", type=float, default=0.0,
                   help="bitwise self-correction: each row flips fed bits with probability U(0, flip-max)")
    g.add_argument("--replay", type=int, default=0,
                   help="keep this many encoded images on the device and train on them again while new ones "
                        "render (0: every row rendered for its step; a GPU outruns the renderers)")
    g.add_argument("--amp", choices=("bf16",), help="forward and loss under bfloat16 autocast (a GPU)")
    g.add_argument("--stop-after", type=int, help="stop (and save) after this many steps of the --steps schedule")
    g.add_argument("--profile", type=Path, help="write a torch.profiler table of steps 25-29 to this file")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its transformer.ckpt: the same command plus --resume "
                        "(the checkpoint's schedule: --steps is not needed; --minutes only bounds this part)")
    a = p.parse_args(argv)
    if a.steps is None and not (a.what == "transformer" and a.resume):
        p.error("--steps is required (except to --resume a transformer run)")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    d = DEFAULTS[a.what]
    args = TrainArgs(out=a.out, steps=a.steps or 0, batch_size=a.batch_size or d["batch_size"], lr=a.lr or d["lr"],
                     seed=a.seed, data_seed=a.data_seed, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                     log_every=a.log_every, save_every=a.save_every, device=a.device, workers=a.workers,
                     minutes=a.minutes)
    if torch.device(a.device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on a GPU; float32 storage and optimizer
    if a.what == "vae":
        from .train_vae import train_vae

        train_vae(args, crop=a.crop, beta=a.beta, init=str(a.init) if a.init else None, shape_weight=a.shape_weight)
    elif a.what == "text":
        from .train_text import train_text_encoder

        train_text_encoder(args, qk_scale=a.qk_scale)
    else:
        from .train_transformer import train_transformer

        train_transformer(args, a.vae or a.out / "vae.safetensors", cond_drop=a.cond_drop,
                          per_scale_loss=a.per_scale_loss, init=a.init_transformer, stop_after=a.stop_after,
                          flip_max=a.flip_max, replay=a.replay, amp=a.amp, last_scale_weight=a.last_scale_weight,
                          profile=a.profile, resume=a.resume)


if __name__ == "__main__":
    main()
