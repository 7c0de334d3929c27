"""Shared pieces of the demo training runs: seeding, data batches, optimiser, schedule, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from model_loader.checkpoint_io import save_safetensors

from .dataset import batch_tensors, make_split

logger = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    out: Path
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    data_seed: int = 0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 10
    save_every: int = 0
    device: str = "cpu"
    """Where the models and batches live ("cuda" on a lent GPU); data is drawn on the CPU either way."""
    workers: int = 0
    """Processes rendering batches ahead (0: in the training process)."""
    minutes: float | None = None
    """Wall-clock budget: ``steps`` is then an upper bound, fitted after a probe (see TimeBudget)."""
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_batch(step: int, batch_size: int, data_seed: int) -> tuple[torch.Tensor, list[str]]:
    """Batch ``step`` of the (infinite, deterministic) train stream: samples step*B .. step*B+B-1."""
    return batch_tensors(make_split(batch_size, data_seed, "train", start=step * batch_size))


class _StreamBatches(torch.utils.data.Dataset):
    """Batches ``0 .. steps - 1`` of the train stream, by index (so worker processes can draw them)."""

    def __init__(self, steps: int, batch_size: int, data_seed: int) -> None:
        self.steps, self.batch_size, self.data_seed = steps, batch_size, data_seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, list[str]]:
        return train_batch(step, self.batch_size, self.data_seed)


def train_batches(steps: int, batch_size: int, data_seed: int,
                  workers: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches 0, 1, ... of the train stream, in order; with ``workers`` they are rendered ahead in
    that many processes (the same batches: a GPU step outruns one CPU core's ~10 ms per image)."""
    ds = _StreamBatches(steps, batch_size, data_seed)
    if workers <= 0:
        yield from (ds[i] for i in range(steps))
        return
    yield from torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                           prefetch_factor=4, persistent_workers=False)


class TimeBudget:
    """Fits a run's step count to a wall-clock budget: after ``probe`` steps the remaining time over
    the median step time gives the total, so the LR schedule (warm-up, cosine) ends with the budget."""

    def __init__(self, minutes: float | None, probe: int = 20) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.probe = probe
        self._t0 = time.perf_counter()

    def fit(self, step: int, args: TrainArgs, log: RunLog) -> TrainArgs:
        """``args`` with ``steps`` fitted once ``step + 1 == probe`` (unchanged otherwise)."""
        if self.seconds is None or step + 1 != self.probe:
            return args
        per_step = float(np.median(log.step_times[max(1, self.probe // 4):])) if len(log.step_times) > 1 \
            else log.step_times[-1]
        left = self.seconds - (time.perf_counter() - self._t0)
        steps = max(step + 1, min(args.steps, step + 1 + int(left / max(per_step, 1e-6))))
        logger.info("time budget %.0f s: %.3f s/step -> %d steps", self.seconds, per_step, steps)
        args = replace(args, steps=steps)
        log.args = args
        return args


def make_optimizer(module: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.97)) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and conv kernels (not biases, norms, embeddings of rows)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name and "cfg_uncond" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    warm = max(1, int(args.warmup_frac * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(module: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, step: int,
                   args: TrainArgs) -> float:
    """Backward, clip, set the scheduled LR, step; returns the pre-clip gradient norm."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, args)
    opt.step()
    return float(norm)


class RunLog:
    """Per-step losses and timings, logged every ``log_every`` steps and saved in the run's JSON."""

    def __init__(self, args: TrainArgs) -> None:
        self.args = args
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self._t = time.perf_counter()

    def record(self, step: int, **values: float) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self._t = now
        self.history.append({"step": step, **{k: float(v) for k, v in values.items()}})
        if step % self.args.log_every == 0 or step == self.args.steps - 1:
            vals = " ".join(f"{k}={v:.4f}" for k, v in values.items())
            logger.info("step %d/%d %s lr=%.2e %.2fs/step", step, self.args.steps, vals, lr_at(step, self.args),
                        self.step_times[-1])

    def summary(self) -> dict[str, Any]:
        times = self.step_times[1:] or self.step_times  # the first step pays one-off costs
        return {"steps_done": len(self.history), "median_step_s": float(np.median(times)) if times else None,
                "total_s": float(sum(self.step_times)), "history": self.history}


def save_run(module: nn.Module, out: Path, name: str, config: Any, args: TrainArgs, log: RunLog) -> Path:
    """``<out>/<name>.safetensors`` (our state-dict names) and ``<out>/<name>.json`` (config, args, losses)."""
    out.mkdir(parents=True, exist_ok=True)
    path = save_safetensors(module, out / f"{name}.safetensors", metadata={"demo_model": name})
    args_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}
    meta = {"config": asdict(config), "args": args_d, **log.summary()}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    logger.info("saved %s and %s.json", path, name)
    return path
