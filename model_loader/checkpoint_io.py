"""Readers for the official checkpoint layouts, none of which unpickles code.

* a single ``.pth``/``.bin`` file: ``torch.load(weights_only=True, mmap=True)``; the weights may
  be nested under ``['trainer']['gpt_fsdp']`` (training checkpoint) or, for a VAE, under ``'vae'``;
* a folder with an HF-style index (``model.safetensors.index.json`` or
  ``pytorch_model.bin.index.json``) whose ``weight_map`` names ``.bin``/``.pth`` or
  ``.safetensors`` shards;
* a ``.safetensors`` file, memory-mapped: every tensor is a view of one private file mapping,
  so nothing is read until it is used.

Readers yield one file's state dict at a time so a caller can convert shard by shard.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint_report import CheckpointError

log = logging.getLogger(__name__)

Kind = Literal["transformer", "vae"]
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint consists of; raises CheckpointError if any of them is absent."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (no such file or folder)")
    if p.is_file():
        return [p]
    index = next((p / n for n in INDEX_NAMES if (p / n).is_file()), None)
    if index is None:
        found = sorted(x.name for x in p.glob("*.index.json"))
        if len(found) != 1:
            raise CheckpointError(f"checkpoint folder {p} has no index json "
                                  f"(expected one of {', '.join(INDEX_NAMES)})")
        index = p / found[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint index {index} is unreadable or has no weight_map: {e}") from e
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts]
    if outside:
        raise CheckpointError(f"checkpoint index {index} names shard(s) outside its folder: {', '.join(outside)}")
    missing = [s for s in shards if not (p / s).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint folder {p}: {len(missing)} shard(s) listed in {index.name} are "
                              f"missing: {', '.join(missing)}")
    if not shards:
        raise CheckpointError(f"checkpoint index {index} lists no shards")
    return [p / s for s in shards]


def iter_state_dicts(path: str | Path, kind: Kind = "transformer") -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (file, state dict) for each file of a checkpoint, in shard order."""
    for f in checkpoint_files(path):
        yield f, read_file(f, kind)


def read_file(path: Path, kind: Kind = "transformer") -> dict[str, Any]:
    """One file's raw state dict (values not yet validated as tensors)."""
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return read_safetensors(path)
    return _unwrap(read_torch(path), path, kind)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name (``.pth``): an 8-byte header length, then its JSON.
    torch.save files start with a zip or pickle signature instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000


def read_torch(path: Path) -> Any:
    """torch.load with weights_only=True and mmap=True (falling back to no mmap for the legacy format)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            log.warning("%s uses the legacy torch.save format; reading it without mmap", path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_global(e)
        if refused:
            raise CheckpointError(f"refusing to unpickle {path}: it references {refused}, which is not a "
                                  "tensor or plain container (a pickle that would run code)") from e
        raise CheckpointError(f"could not read {path}: not a state dict that loads without running code "
                              "(torch.load weights_only), or a damaged file") from e
    except Exception as e:  # zip, EOF and stream errors of a damaged file
        raise CheckpointError(f"could not read {path} (corrupted or truncated?): {first_line(e)}") from e


def refused_global(e: pickle.UnpicklingError) -> str | None:
    """The global torch.load(weights_only=True) refused, if that is why it failed. torch words it
    "Unsupported global: GLOBAL x" or "... unsupported GLOBAL x whose module is blocked" (os,
    subprocess, ...); either way its advice to load unsafely is never passed on."""
    m = re.search(r"GLOBAL (\S+)", str(e))
    return m.group(1) if m else None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _unwrap(obj: Any, path: Path, kind: Kind) -> dict[str, Any]:
    if isinstance(obj, Mapping) and isinstance(obj.get("trainer"), Mapping) and "gpt_fsdp" in obj["trainer"]:
        obj = obj["trainer"]["gpt_fsdp"]
    if kind == "vae" and isinstance(obj, Mapping) and isinstance(obj.get("vae"), Mapping):
        obj = obj["vae"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return dict(obj)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file; tensors are views of one copy-on-write mapping of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = {k: _parse_entry(k, v, size - 8 - n) for k, v in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"could not read {path} (corrupted or truncated safetensors file?): {e}") from e
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, begin, end) in entries.items():
        start = 8 + n + begin
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, start, (end - begin,), (1,))
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start % itemsize:
            flat = flat.clone()  # misaligned (not written by safetensors): one copy of this tensor
        out[key] = flat.view(dtype).reshape(shape)
    return out


def _parse_entry(key: str, info: dict[str, Any], data_bytes: int) -> tuple[torch.dtype, list[int], int, int]:
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{key}: unsupported dtype {info['dtype']}")
    shape = [int(s) for s in info["shape"]]
    begin, end = (int(x) for x in info["data_offsets"])
    numel = 1
    for s in shape:
        numel *= s
    if not 0 <= begin <= end <= data_bytes:
        raise ValueError(f"{key}: data offsets {begin}..{end} outside the {data_bytes} data bytes "
                         "(truncated?)")
    if end - begin != numel * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"{key}: {end - begin} bytes do not hold shape {shape} of {info['dtype']}")
    return dtype, shape, begin, end


def save_safetensors(module: nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a module's state dict (or a state dict) as one safetensors file, keeping dtypes.

    Entries sharing memory (the VAE's quantizer/quantize masks) are written as separate copies
    so that every state-dict key is present in the file.
    """
    sd = module.state_dict() if isinstance(module, nn.Module) else dict(module)
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        t = t.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        out[k] = t.clone() if ident in seen else t
        seen.add(ident)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})
    return path
