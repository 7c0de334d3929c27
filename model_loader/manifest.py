"""State-dict manifest of a preset, in the format of the official key manifests (*.keys.tsv).

Usage: ``python -m model_loader.manifest PRESET [--vae]``. Columns: key, shape (joined by x),
dtype as constructed, kind (param/buffer), inference_dtype (the official dtype policy).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

from .checkpoint import target_dtype
from .checkpoint_io import Kind
from .configs import get_preset
from .transformer import build_transformer
from .vae import build_vae

HEADER = "key\tshape\tdtype\tkind\tinference_dtype"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_rows(module: nn.Module, kind: Kind) -> list[tuple[str, str, str, str, str]]:
    """(key, shape, dtype, kind, inference_dtype) for every state-dict entry, in state-dict order."""
    params = {id(p) for p in module.parameters()}
    rows = []
    for key, t in module.state_dict(keep_vars=True).items():
        shape = "x".join(str(s) for s in t.shape)
        role = "param" if id(t) in params else "buffer"
        infer = target_dtype(key, t.dtype, "official", kind)
        rows.append((key, shape, _dtype_name(t.dtype), role, _dtype_name(infer)))
    return rows


def manifest_text(preset_name: str, vae: bool = False) -> str:
    """The manifest of a preset's transformer (or VAE) built on the meta device, newline-terminated."""
    preset = get_preset(preset_name)
    if vae:
        rows = manifest_rows(build_vae(preset.vae, device="meta"), "vae")
    else:
        rows = manifest_rows(build_transformer(preset.transformer, device="meta"), "transformer")
    return "\n".join([HEADER, *("\t".join(r) for r in rows)]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model_loader.manifest", description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="preset name, e.g. infinity-2b")
    ap.add_argument("--vae", action="store_true", help="the preset's VAE instead of its transformer")
    args = ap.parse_args(argv)
    sys.stdout.write(manifest_text(args.preset, args.vae))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
