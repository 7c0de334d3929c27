"""Pure batch formation (no Redis, no torch): FIFO over batch keys, Triton max-wait semantics."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import JobSpec
from .worker_queue import Entry


@dataclass
class Held:
    """A job this worker has claimed from the stream but not yet run."""

    entry: Entry
    spec: JobSpec


def oldest(held: list[Held]) -> Held:
    return min(held, key=lambda h: (h.entry.created_ms, h.entry.entry_id))


def select_batch(held: list[Held], max_images: int) -> tuple[list[Held], list[Held]]:
    """The oldest job's batch key decides; fill with same-key jobs in arrival order up to max_images.

    Returns (batch, rest). A job's n images are never split; the oldest job always runs.
    """
    if not held:
        return [], []
    key = oldest(held).spec.batch_key
    same = sorted((h for h in held if h.spec.batch_key == key), key=lambda h: (h.entry.created_ms, h.entry.entry_id))
    batch: list[Held] = []
    images = 0
    for h in same:
        if not batch or images + h.spec.n <= max_images:
            batch.append(h)
            images += h.spec.n
    chosen = {id(h) for h in batch}
    return batch, [h for h in held if id(h) not in chosen]


def batch_images(held: list[Held]) -> int:
    return sum(h.spec.n for h in held)


def should_dispatch(held: list[Held], *, max_images: int, max_wait_s: float, now: float) -> bool:
    """Dispatch when the oldest key's batch is full or the oldest job has waited max_wait_s here."""
    if not held:
        return False
    batch, _ = select_batch(held, max_images)
    if batch_images(batch) >= max_images or len(batch) < sum(1 for h in held
                                                              if h.spec.batch_key == batch[0].spec.batch_key):
        return True
    return now - oldest(held).entry.claimed_at >= max_wait_s
