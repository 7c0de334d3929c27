"""Strict, code-free loading of official Infinity checkpoints into our modules.

The official loaders copy non-strictly and silently keep random weights for anything they do
not find (infinity-spec.md 2.3, 7.1). Here every key is checked: missing, unexpected and
mis-shaped entries raise ``CheckpointError`` with a ``LoadReport``; nothing is returned on error.

Modules are built on the meta device and the file's tensors are assigned into them
(``load_state_dict(strict=True, assign=True)``) after conversion to the dtype policy, file by
file. A tensor that already has the target dtype and device is assigned as is, so an mmap'd
bf16 checkpoint is never copied into RAM by the loader.

Only documented adaptations happen: the legacy transformer entries lvl_1L,
attn_bias_for_masking, Infinity_visible_kvlen and Infinity_invisible_qlen are dropped, legacy
(unwrapped) VAE conv/norm names are mapped onto the wrapped ones, and the constant buffers
(``zero_k_bias``, the VAE bit masks) are recomputed when a file omits them. When a file has
them, their values are checked. The official cfg_uncond row adaptation is not done: a table
of another length is reported as mis-shaped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from .checkpoint_io import Kind, checkpoint_files, iter_state_dicts, read_file, save_safetensors
from .checkpoint_report import CheckpointError, LoadReport
from .configs import ModelPreset, TransformerConfig, VAEConfig, get_preset
from .model import InfinityModel, TextEncoder
from .transformer import InfinityTransformer, build_transformer
from .vae import BSQVAE, build_vae

__all__ = [
    "CheckpointError", "LoadReport", "DtypePolicy", "load_model", "load_transformer", "load_vae",
    "load_into", "save_safetensors", "target_dtype", "checkpoint_files", "read_file",
]

log = logging.getLogger(__name__)

DtypePolicy = Literal["official", "float32", "bfloat16"]
"""official: floating entries under block_chunks. in bf16, the rest (and the VAE) in fp32;
float32 / bfloat16: every floating entry in that dtype. Integer buffers keep their dtype."""
DTYPE_POLICIES: tuple[str, ...] = ("official", "float32", "bfloat16")

LEGACY_TRANSFORMER_KEYS = frozenset({"lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen",
                                     "Infinity_invisible_qlen"})
_CONV_LIKE = ("conv", ".q.", ".k.", ".v.", ".proj_out.", ".nin_shortcut.")
_BLOCK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")


def target_dtype(key: str, dtype: torch.dtype, policy: DtypePolicy, kind: Kind) -> torch.dtype:
    """The dtype an entry is held in after loading under ``policy``."""
    if not dtype.is_floating_point:
        return dtype
    if policy == "float32":
        return torch.float32
    if policy == "bfloat16":
        return torch.bfloat16
    if kind == "transformer" and key.startswith("block_chunks."):
        return torch.bfloat16
    return torch.float32


def check_policy(policy: str) -> None:
    if policy not in DTYPE_POLICIES:
        raise ValueError(f"unknown dtype policy {policy!r}; use one of {', '.join(DTYPE_POLICIES)}")


# ----------------------------------------------------------------------------- key handling

def _model_key(key: str, expected: Mapping[str, torch.Tensor], kind: Kind, report: LoadReport) -> str | None:
    """The model key a file key loads into, or None when it is a documented legacy entry."""
    if key in expected:
        return key
    if kind == "transformer" and key in LEGACY_TRANSFORMER_KEYS:
        report.dropped.append(key)
        return None
    if kind == "vae" and key.endswith((".weight", ".bias")):
        base, suffix = key.rsplit(".", 1)
        wrapped = f"{base}.conv.{suffix}" if any(s in key for s in _CONV_LIKE) else None
        if wrapped is None or wrapped not in expected:
            wrapped = f"{base}.norm.{suffix}"
        if wrapped in expected:
            report.renamed[key] = wrapped
            return wrapped
    return key


def _constant_value(key: str, like: torch.Tensor, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor | None:
    """The value of a constant buffer (zero_k_bias, lfq.mask), or None for learned entries."""
    if key.endswith("zero_k_bias"):
        return torch.zeros(like.shape, dtype=dtype, device=device)
    if key.endswith("lfq.mask"):
        n = like.shape[0]
        return (2 ** torch.arange(n - 1, -1, -1, device=device)).to(dtype)
    return None


def _check_constants(out: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     dtypes: Mapping[str, torch.dtype], device: torch.device, report: LoadReport) -> None:
    """Check zero_k_bias / lfq.mask values; recompute those the file omits."""
    for key, like in expected.items():
        want = _constant_value(key, like, like.dtype, device)
        if want is None or key in report.mis_shaped or key in report.bad_values:
            continue
        if key not in out:
            out[key] = want.to(dtypes[key])
            report.recreated.append(key)
        elif not torch.equal(out[key].to(device=want.device, dtype=want.dtype), want):
            what = "zeros" if key.endswith("zero_k_bias") else "powers of two, most significant first"
            report.bad_values[key] = f"this constant buffer must hold {what}"


def _architecture_notes(found: dict[str, tuple[int, ...]], kind: Kind, name: str,
                        cfg: TransformerConfig | VAEConfig) -> list[str]:
    """Top-line explanations of a checkpoint built for another model."""
    notes: list[str] = []
    if isinstance(cfg, VAEConfig):
        shape = found.get("encoder.conv_out.conv.weight") or found.get("quantizer.lfq.mask")
        if shape and shape[0] != cfg.codebook_bits:
            notes.append(f"VAE has {shape[0]} code bits but preset {name} expects {cfg.codebook_bits}")
        return notes
    pos = found.get("pos_start")
    if pos and pos[-1] != cfg.embed_dim:
        notes.append(f"transformer has width {pos[-1]} but preset {name} expects {cfg.embed_dim}")
    emb = found.get("word_embed.weight")
    if emb and len(emb) == 2 and emb[1] != cfg.token_bits:
        notes.append(f"transformer has {emb[1]} bits per token but preset {name} expects {cfg.token_bits}")
    blocks = {m.group(0) for k in found if (m := _BLOCK_RE.match(k))}
    if blocks and len(blocks) != cfg.depth:
        notes.append(f"transformer has {len(blocks)} blocks but preset {name} expects {cfg.depth}")
    return notes


def collect_state_dict(module: nn.Module, path: str | Path, kind: Kind, *,
                       device: torch.device | str = "cpu", dtype_policy: DtypePolicy = "official",
                       name: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read, check and convert a checkpoint for ``module`` (usually on meta), file by file.

    Raises CheckpointError with a report unless every key of the module is found with its shape.
    """
    check_policy(dtype_policy)
    device = torch.device(device)
    expected = module.state_dict()
    report = LoadReport()
    dtypes = {k: target_dtype(k, t.dtype, dtype_policy, kind) for k, t in expected.items()}
    out: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[int, ...]] = {}
    for file, raw in iter_state_dicts(path, kind):
        report.files.append(file)
        for key, value in raw.items():
            mkey = _model_key(key, expected, kind, report)
            if mkey is None:
                continue
            if not isinstance(value, torch.Tensor):
                report.unexpected.append(f"{key} (a {type(value).__name__}, not a tensor)")
                continue
            found[mkey] = tuple(value.shape)
            if mkey not in expected:
                report.unexpected.append(key)
                continue
            exp = expected[mkey]
            if mkey in out:
                report.bad_values[mkey] = f"stored twice (again in {file.name})"
            elif tuple(value.shape) != tuple(exp.shape):
                report.mis_shaped[mkey] = (tuple(exp.shape), tuple(value.shape))
            elif value.dtype.is_floating_point != exp.dtype.is_floating_point:
                report.bad_values[mkey] = f"dtype {value.dtype} where the model has {exp.dtype}"
            else:
                out[mkey] = value  # converted once every file has been checked
        del raw
    _check_constants(out, expected, dtypes, device, report)
    report.missing = [k for k in expected if k not in out and k not in report.mis_shaped
                      and k not in report.bad_values]
    if not report.ok:
        report.mis_shaped = {k: report.mis_shaped[k] for k in expected if k in report.mis_shaped}
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, (TransformerConfig, VAEConfig)):
            report.notes = _architecture_notes(found, kind, name or "(custom config)", cfg)
        raise CheckpointError(report)
    # Only now read and convert the values: a file that does not fit is reported from its keys and
    # shapes alone (mapped, not read: a 609 MB .pth missing one key was read in full, 547 MB in 6.4 s
    # from a cold cache, now 3.7 MB; and nothing is copied to the GPU first); one tensor at a time
    recreated = set(report.recreated)
    for k in list(out):
        if k not in recreated:
            out[k] = out[k].to(device=device, dtype=dtypes[k])
    if report.recreated:
        log.info("%s: recomputed %d constant buffer(s) absent from the file", report.source,
                 len(report.recreated))
    if report.dropped or report.renamed:
        log.info("%s: dropped %d legacy entries, mapped %d legacy names", report.source,
                 len(report.dropped), len(report.renamed))
    return out, report


def load_into(module: nn.Module, path: str | Path, kind: Kind, *, device: torch.device | str = "cpu",
              dtype_policy: DtypePolicy = "official", name: str = "") -> LoadReport:
    """Check and assign a checkpoint into a (meta) module; the module is put in eval mode without grads."""
    sd, report = collect_state_dict(module, path, kind, device=device, dtype_policy=dtype_policy, name=name)
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # the check above should make this unreachable
        raise CheckpointError(f"checkpoint {report.source} could not be assigned: {e}", report) from e
    del sd
    _restore_computed_state(module, torch.device(device))
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {report.source}: entries left uninitialised: "
                              f"{', '.join(left[:10])}", report)
    module.eval().requires_grad_(False)
    return report


def _restore_computed_state(module: nn.Module, device: torch.device) -> None:
    """Recreate non-persistent (computed) state: modules that own some define init_computed_state."""
    for sub in module.modules():
        if hasattr(sub, "init_computed_state"):
            sub.init_computed_state(device)


# ----------------------------------------------------------------------------- public loaders

def _resolve(preset: str | ModelPreset) -> ModelPreset:
    return get_preset(preset) if isinstance(preset, str) else preset


def load_transformer(preset: str | ModelPreset | TransformerConfig, path: str | Path, *,
                     device: torch.device | str = "cpu",
                     dtype_policy: DtypePolicy = "official") -> InfinityTransformer:
    """Build the transformer on meta and assign the checked checkpoint at ``path`` into it."""
    cfg, name = _transformer_cfg(preset)
    module = build_transformer(cfg, device="meta")
    load_into(module, path, "transformer", device=device, dtype_policy=dtype_policy, name=name)
    return module


def load_vae(preset: str | ModelPreset | VAEConfig, path: str | Path, *, device: torch.device | str = "cpu",
             dtype_policy: DtypePolicy = "official") -> BSQVAE:
    """Build the BSQ VAE on meta and assign the checked checkpoint (a .pth with 'vae', or safetensors)."""
    if isinstance(preset, VAEConfig):
        cfg, name = preset, ""
    else:
        p = _resolve(preset)
        cfg, name = p.vae, p.name
    module = build_vae(cfg, device="meta")
    load_into(module, path, "vae", device=device, dtype_policy=dtype_policy, name=name)
    return module


def _transformer_cfg(preset: str | ModelPreset | TransformerConfig) -> tuple[TransformerConfig, str]:
    if isinstance(preset, TransformerConfig):
        return preset, ""
    p = _resolve(preset)
    return p.transformer, p.name


def load_model(preset: str | ModelPreset, *, transformer_path: str | Path, vae_path: str | Path,
               device: torch.device | str = "cpu", dtype_policy: DtypePolicy = "official",
               text_encoder: TextEncoder | None = None) -> InfinityModel:
    """Load VAE (first: small, and fails fast when it is the wrong one) and transformer of a preset."""
    p = _resolve(preset)
    check_policy(dtype_policy)
    vae = load_vae(p, vae_path, device=device, dtype_policy=dtype_policy)
    transformer = load_transformer(p, transformer_path, device=device, dtype_policy=dtype_policy)
    compute = torch.float32 if dtype_policy == "float32" else torch.bfloat16
    log.info("loaded %s (dtype policy %s) on %s", p.name, dtype_policy, device)
    return InfinityModel(preset=p, transformer=transformer, vae=vae, text_encoder=text_encoder,
                         compute_dtype=compute)
