"""Shared pieces of the demo training runs: seeding, data batches, optimiser, schedule, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import signal
import threading
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


def train_batches(steps: int, batch_size: int, data_seed: int, workers: int = 0,
                  start: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches ``start``, ``start + 1``, ... ``steps - 1`` of the train stream, in order (a resumed
    run starts where it stopped); with ``workers`` they are rendered ahead in that many processes
    (the same batches: a GPU step outruns one CPU core's ~7 ms per image, 5 of them rendering and 2
    converting; 12 ms before shapes were drawn in their own windows)."""
    ds = _StreamBatches(steps, batch_size, data_seed)
    if workers <= 0:
        yield from (ds[i] for i in range(start, steps))
        return
    yield from torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, steps), num_workers=workers,
                                           prefetch_factor=4, persistent_workers=False)


class BackgroundBatches:
    """Iterates a batch stream in a thread so the training loop can take whatever is ready without
    waiting (``ready``): with a replay buffer, the GPU steps at its own pace instead of the renderers'."""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, list[str]]], depth: int = 8) -> None:
        self._batches = batches
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-batches", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the loop stopped listening first; False then."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._batches:
                if not self._put(item):
                    break
        except BaseException as exc:  # noqa: BLE001 -- handed to the training loop, which raises it
            self._put(exc)
        finally:
            self._put(None)  # end of stream
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()

    def ready(self, block: bool) -> list[tuple[torch.Tensor, list[str]]]:
        """Every batch rendered so far; with ``block`` at least one (an empty list at the end of the stream)."""
        out = []
        while True:
            try:
                item = self._queue.get(block=block and not out)
            except queue.Empty:
                return out
            if item is None:
                self._queue.put(None)  # stays at the end for later calls
                return out
            if isinstance(item, BaseException):
                raise item
            out.append(item)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class ReplayBuffer:
    """A ring of encoded training rows (``row_shape`` tensors, e.g. VAE latents) and their captions,
    on the training device. Rendering the procedural images on the CPU (~1,000 per second with 14
    processes) is slower than a GPU step, so each rendered image is encoded once and sampled again."""

    def __init__(self, capacity: int, row_shape: tuple[int, ...], device: str | torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.rows = torch.empty((capacity, *row_shape), device=device)
        self.captions: list[str | None] = [None] * capacity
        self.size = 0
        self._next = 0
        self.added = 0

    def add(self, rows_B: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Store rows (overwriting the oldest once full); returns the slots they went to (B,)."""
        cap = self.rows.shape[0]
        slots_B = (torch.arange(len(captions)) + self._next) % cap
        self.rows[slots_B.to(self.rows.device)] = rows_B.to(self.rows.device, self.rows.dtype)
        for slot, text in zip(slots_B.tolist(), captions, strict=True):
            self.captions[slot] = text
        self._next = int((self._next + len(captions)) % cap)
        self.size = min(cap, self.size + len(captions))
        self.added += len(captions)
        return slots_B

    def batch(self, n: int, fresh_slots: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
        """``n`` slots: the fresh ones first (at most ``n``), the rest drawn uniformly from the buffer."""
        if self.size == 0:
            raise ValueError("the replay buffer is empty")
        fresh = fresh_slots[:n] if fresh_slots is not None else torch.zeros(0, dtype=torch.long)
        drawn = torch.randint(self.size, (n - len(fresh),), generator=gen)
        return torch.cat([fresh.long(), drawn])

    def take(self, slots: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        return self.rows[slots.to(self.rows.device)], [self.captions[i] for i in slots.tolist()]


class StepProfiler:
    """torch.profiler over steps ``start .. start + steps - 1`` of a run, written to ``path`` as two
    tables of the top ops (by total and by self time; device time on a GPU, CPU time otherwise), so a
    lent GPU's first run shows where a training step goes. The run labels its phases with
    ``torch.profiler.record_function`` (they appear as rows). ``path`` None: does nothing.

    The default start (25) is after ``TimeBudget``'s 20-step probe, so the profiler's overhead does
    not enter the fitted step count. A profiler that fails is logged and dropped: it never stops a run.
    """

    def __init__(self, path: Path | None, device: torch.device, start: int = 25, steps: int = 5):
        self.path, self.device, self.start, self.steps = path, device, start, steps
        self._prof: torch.profiler.profile | None = None
        self._t0 = 0.0

    def before(self, step: int) -> None:
        if self.path is None or step != self.start:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        try:
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        except Exception:  # noqa: BLE001 - diagnostics only
            logger.exception("profiler did not start; training goes on without it")
            return
        self._prof, self._t0 = prof, time.perf_counter()

    def after(self, step: int) -> None:
        if self._prof is not None and step == self.start + self.steps - 1:
            self.close()

    def close(self) -> None:
        """Stops and writes the tables (a run that ends inside the window writes what it has)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        unit = "cuda" if self.device.type == "cuda" else "cpu"
        try:
            prof.__exit__(None, None, None)
            ev = prof.key_averages()
            parts = [f"# steps {self.start}..{self.start + self.steps - 1}: {wall:.3f} s wall under the profiler\n"]
            for sort in (f"{unit}_time_total", f"self_{unit}_time_total"):
                parts.append(f"\n# sorted by {sort}\n{ev.table(sort_by=sort, row_limit=40)}\n")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(parts))
        except Exception:  # noqa: BLE001 - diagnostics only
            logger.exception("profiler tables not written; training goes on")
            return
        logger.info("wrote the profile of steps %d-%d to %s", self.start, self.start + self.steps - 1, self.path)


class StopOnSignal:
    """While entered (in the main thread), the first SIGINT or SIGTERM only sets ``requested``: the
    training loop then stops after its step and saves as at its end (a ``timeout`` or Ctrl-C loses
    nothing but the step under way). A second one does what it did before."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, sig: int, _frame: Any) -> None:
        if self.requested is not None:
            self._restore()
            signal.raise_signal(sig)
            return
        self.requested = sig
        logger.warning("%s: stopping after this step and saving (again to stop now)", signal.Signals(sig).name)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


class TimeBudget:
    """Fits a run's step count to a wall-clock budget: after ``probe`` steps the remaining time over
    the median step time gives the total, so the LR schedule (warm-up, cosine) ends with the budget.

    Steps can slow down after the probe (a GPU run's did, from 0.32 to 0.67 s at times, and ran 7 %
    over, into the timeout of the script around it, before it saved): ``over`` says when the budget
    plus ``grace`` has passed, and the loops then stop early and save.

    A resumed run (``refit=False``, its first step ``first_step``) keeps the schedule it was started
    with: the budget then only says when to stop (and save a checkpoint), with no grace, after at
    least one step.
    """

    def __init__(self, minutes: float | None, probe: int = 20, grace: float = 0.03,
                 clock=time.perf_counter, *, first_step: int = 0, refit: bool = True) -> None:
        self.seconds = None if minutes is None else minutes * 60.0
        self.probe = probe if refit else 1
        self.grace = grace if refit else 0.0
        self.first_step = first_step
        self.refit = refit
        self._clock = clock
        self._t0 = clock()

    def fit(self, step: int, args: TrainArgs, log: RunLog) -> TrainArgs:
        """``args`` with ``steps`` fitted once ``step + 1 == probe`` (unchanged otherwise)."""
        if self.seconds is None or not self.refit or step + 1 - self.first_step != self.probe:
            return args
        per_step = float(np.median(log.step_times[max(1, self.probe // 4):])) if len(log.step_times) > 1 \
            else log.step_times[-1]
        left = self.seconds - (self._clock() - self._t0)
        steps = max(step + 1, min(args.steps, step + 1 + int(left / max(per_step, 1e-6))))
        logger.info("time budget %.0f s: %.3f s/step -> %d steps", self.seconds, per_step, steps)
        args = replace(args, steps=steps)
        log.args = args
        return args

    def over(self, step: int) -> bool:
        """After the probe, whether the budget (plus ``grace`` of it) has run out."""
        if self.seconds is None or step - self.first_step < self.probe:
            return False
        if self._clock() - self._t0 <= self.seconds * (1 + self.grace):
            return False
        logger.warning("time budget %.0f s over after %d steps: stopping early", self.seconds, step)
        return True


def make_optimizer(module: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.97)) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices and conv kernels (not biases, norms, embeddings of rows).
    On a GPU the fused kernel (one launch for every parameter)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name and "cfg_uncond" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    warm = max(1, int(args.warmup_frac * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(module: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, step: int,
                   args: TrainArgs, sync: bool = True) -> float | torch.Tensor:
    """Backward, clip, set the scheduled LR, step; returns the pre-clip gradient norm.

    ``sync=False`` skips the finiteness check and returns the norm as a device tensor, so a GPU
    step is not stalled twice; the caller then checks the loss it reads back (``check_finite``)."""
    if sync and not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, args)
    opt.step()
    return float(norm) if sync else norm.detach()


def check_finite(values: dict[str, float], step: int) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{', '.join(bad)} not finite at step {step}: {values}")


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


def args_dict(args: TrainArgs) -> dict[str, Any]:
    """The run's arguments as JSON-ready values (paths as strings), as every run JSON records them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()}


def save_run(module: nn.Module, out: Path, name: str, config: Any, args: TrainArgs, log: RunLog) -> Path:
    """``<out>/<name>.safetensors`` (our state-dict names) and ``<out>/<name>.json`` (config, args, losses)."""
    out.mkdir(parents=True, exist_ok=True)
    path = save_safetensors(module, out / f"{name}.safetensors", metadata={"demo_model": name})
    meta = {"config": asdict(config), "args": args_dict(args), **log.summary()}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    logger.info("saved %s and %s.json", path, name)
    return path
