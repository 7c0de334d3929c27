"""What a checkpoint load found: the strict key report and the error that carries it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MAX_LISTED = 10
"""Keys listed per category in an error message; the rest are counted."""


@dataclass
class LoadReport:
    """Result of matching a checkpoint's keys and shapes against the module built for a preset."""

    files: list[Path] = field(default_factory=list)
    """Every file read (one, or the shards of a folder)."""
    missing: list[str] = field(default_factory=list)
    """Keys the module has and the checkpoint lacks."""
    unexpected: list[str] = field(default_factory=list)
    """Keys the checkpoint has and the module lacks."""
    mis_shaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    """key -> (expected shape, found shape)."""
    bad_values: dict[str, str] = field(default_factory=dict)
    """key -> why a constant buffer (zero_k_bias, lfq.mask) holds a wrong value."""
    notes: list[str] = field(default_factory=list)
    """Top-line findings, e.g. a VAE whose bit count does not fit the preset."""
    renamed: dict[str, str] = field(default_factory=dict)
    """Legacy file key -> model key it was mapped to."""
    dropped: list[str] = field(default_factory=list)
    """Documented legacy entries that were discarded."""
    recreated: list[str] = field(default_factory=list)
    """Constant buffers absent from the file and recomputed."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped or self.bad_values)

    @property
    def source(self) -> str:
        if not self.files:
            return "<no file>"
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0].parent} ({len(self.files)} shards)"

    def summary(self) -> str:
        """Multi-line description naming the file(s), the notes and the offending keys."""
        lines = [f"checkpoint {self.source} does not match the model:"]
        lines += [f"  {n}" for n in self.notes]
        lines += _listed("missing keys", self.missing)
        lines += _listed("unexpected keys", self.unexpected)
        lines += _listed("mis-shaped keys", [
            f"{k}: expected {_fmt_shape(e)}, found {_fmt_shape(f)}" for k, (e, f) in self.mis_shaped.items()
        ])
        lines += _listed("wrong constant buffers", [f"{k}: {why}" for k, why in self.bad_values.items()])
        return "\n".join(lines)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "scalar"


def _listed(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    out = [f"  {len(items)} {title}:"]
    out += [f"    {it}" for it in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        out.append(f"    ... and {len(items) - MAX_LISTED} more")
    return out


class CheckpointError(Exception):
    """A checkpoint could not be read or does not fit the model; nothing was loaded.

    ``report`` is set when the file was readable and the key check failed.
    """

    def __init__(self, message: str | LoadReport, report: LoadReport | None = None) -> None:
        if isinstance(message, LoadReport):
            report, message = message, message.summary()
        super().__init__(message)
        self.report = report
