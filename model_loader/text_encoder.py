"""T5 text encoder (the official flan-t5-xl text path, spec section 3) and its factory.

``T5TextEncoder`` loads a tokenizer and a ``T5EncoderModel`` from a local folder only and
turns prompts into a ``TextCond``: features float32 (B, T, C) padded to the longest prompt
(zeros beyond each length) and lens int64 = attention_mask.sum. ``load_text_encoder``
resolves a preset's ``text_encoder`` name; "tiny-t5" is built on demand into a cache folder.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, T5EncoderModel

from .checkpoint_io import first_line, refused_global
from .model import TextEncoder
from .text_cond import TextCond
from .tiny_t5 import build_tiny_t5, tiny_t5_key

logger = logging.getLogger(__name__)

__all__ = [
    "FLAN_T5_NAMES", "TINY_T5_NAME", "T5TextEncoder", "build_tiny_t5", "default_cache_dir",
    "default_text_dtype", "ensure_tiny_t5", "load_text_encoder",
]

FLAN_T5_NAMES: tuple[str, ...] = ("flan-t5-xl", "flan-t5-xl-official")
TINY_T5_NAME = "tiny-t5"
CACHE_ENV = "LDSERVE_CACHE_DIR"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def default_text_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (as the official notebooks load T5), float32 elsewhere (fp16 on CPU is very slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _check_local_folder(path: str | os.PathLike[str]) -> Path:
    """Fail fast, naming the path, when the folder or its files are absent (never fall back to the hub)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 text encoder folder not found: {str(folder)!r} (models are never "
                                "downloaded; pass a local folder with config.json, weights, tokenizer files)")
    missing: list[str] = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if missing:
        raise FileNotFoundError(f"T5 text encoder folder {str(folder)!r} is missing: {'; '.join(missing)}")
    return folder


class T5TextEncoder:
    """Prompts -> TextCond through an HF T5 encoder loaded from a local folder.

    Tokenization follows the official ``encode_prompt``: pad to ``max_length`` (512), truncate,
    ``</s>`` appended. ``pad_to_max_length=False`` pads only to the longest prompt of the batch;
    with the attention mask the features of real tokens are the same up to float rounding.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        max_length: int = 512,
        pad_to_max_length: bool = True,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.path = _check_local_folder(path)
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else default_text_dtype(self.device)
        if self.dtype == torch.float16 and self.device.type == "cpu":
            logger.warning("T5 in float16 on CPU is very slow; float32 or bfloat16 is recommended")
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        where = str(self.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                where, legacy=True, model_max_length=max_length, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(f"could not load the T5 tokenizer from {where!r}: {err}") from err
        except Exception as err:  # noqa: BLE001 - transformers raises anything on a damaged folder
            raise ValueError(f"could not load the T5 tokenizer from {where!r} (tokenizer.json, "
                             f"tokenizer_config.json): {first_line(err)}") from err
        def load(**kw: Any) -> tuple[Any, dict[str, Any]]:
            return T5EncoderModel.from_pretrained(where, dtype=self.dtype, local_files_only=True,
                                                  output_loading_info=True, **kw)

        try:
            try:
                model, info = load()
            except RuntimeError as err:  # wrong shapes: load again to learn which keys (then refused below)
                if "ignore_mismatched_sizes" not in str(err):
                    raise
                model, info = load(ignore_mismatched_sizes=True)
        except OSError as err:
            raise FileNotFoundError(f"could not load the T5 text encoder from {where!r}: {err}") from err
        except pickle.UnpicklingError as err:
            raise ValueError(f"refusing to unpickle the T5 weights in {where!r}: they reference "
                             f"{refused_global(err) or 'an object'}, which is not a tensor or plain container "
                             "(a pickle that would run code)") from err
        except Exception as err:  # noqa: BLE001 - a truncated or damaged weights file
            raise ValueError(f"could not load the T5 text encoder weights in {where!r}: "
                             f"{first_line(err)}") from err
        # transformers fills keys missing from the file with random values and only logs it: features
        # from such an encoder are silently wrong, so a missing key is an error (unexpected keys are
        # not: a full T5 checkpoint also holds the decoder, which the encoder does not use)
        missing = sorted(info.get("missing_keys") or []) + sorted(
            f"{m[0]} (file {tuple(m[1])}, model {tuple(m[2])})" if isinstance(m, tuple) and len(m) == 3 else str(m)
            for m in info.get("mismatched_keys") or [])
        if missing:
            more = f", ... ({len(missing)} in all)" if len(missing) > 8 else ""
            shown = ", ".join(str(k) for k in missing[:8]) + more
            raise ValueError(f"T5 text encoder weights in {where!r} lack {len(missing)} encoder key(s) "
                             f"(or have them in another shape): {shown}")
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer in {str(self.path)!r} has no pad token")
        self.model = model.to(self.device).eval().requires_grad_(False)
        logger.info("loaded T5 text encoder from %s (d_model=%d, %s, %s, max_length=%d)",
                    self.path, self.d_model, self.device, self.dtype, max_length)

    @property
    def d_model(self) -> int:
        """C: channels of the features (2048 for flan-t5-xl, 256 for tiny-t5)."""
        return int(self.model.config.d_model)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(input ids (B, L) int64, attention mask (B, L) int64, per prompt whether it was cut), as
        ``tokenizer(prompts, max_length=max_length, truncation=True, padding=...)`` gives them.

        One tokenizer pass without truncation serves both the length check and the batch; only the
        prompts over ``max_length`` go through the tokenizer's own truncation a second time.
        """
        ids = self.tokenizer(prompts, add_special_tokens=True, truncation=False, padding=False,
                             verbose=False)["input_ids"]
        truncated = [len(x) > self.max_length for x in ids]
        long = [i for i, cut in enumerate(truncated) if cut]
        if long:
            cut_ids = self.tokenizer([prompts[i] for i in long], max_length=self.max_length, truncation=True,
                                     padding=False)["input_ids"]
            for i, x in zip(long, cut_ids, strict=True):
                ids[i] = x
        width = self.max_length if self.pad_to_max_length else max(len(x) for x in ids)
        ids_BL = np.full((len(ids), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask_BL = np.zeros((len(ids), width), dtype=np.int64)
        for b, x in enumerate(ids):
            ids_BL[b, :len(x)] = x
            mask_BL[b, :len(x)] = 1
        return torch.from_numpy(ids_BL), torch.from_numpy(mask_BL), truncated

    def encode(self, prompts: list[str]) -> TextCond:
        return self.encode_with_info(prompts)[0]

    @torch.no_grad()
    def encode_with_info(self, prompts: list[str]) -> tuple[TextCond, list[bool]]:
        """TextCond on the encoder's device and, per prompt, whether it was cut at ``max_length`` tokens."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("every prompt must be a str")
        ids_BL, mask_BL, truncated = self.tokenize(prompts)
        for i, cut in enumerate(truncated):
            if cut:
                logger.warning("prompt %d is longer than %d tokens and was truncated", i, self.max_length)
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        hidden_BLC = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state.float()
        lens_B = mask_BL.sum(dim=1).to(torch.int64)
        t = int(lens_B.max())
        keep_BT = torch.arange(t, device=self.device)[None, :] < lens_B[:, None]
        features_BTC = torch.where(keep_BT[..., None], hidden_BLC[:, :t], 0.0)
        return TextCond(features_BTC.contiguous(), lens_B), truncated


def default_cache_dir() -> Path:
    """``$LDSERVE_CACHE_DIR`` or ``~/.cache/ldserve``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ldserve"


def ensure_tiny_t5(cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """Build the default tiny-t5 into ``<cache>/tiny-t5-<hash>`` once (atomic rename); return the folder."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"{TINY_T5_NAME}-{tiny_t5_key(seed=seed)}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_t5(tmp, seed=seed)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_text_encoder(
    preset_text_encoder: str,
    path: str | os.PathLike[str] | None,
    device: torch.device | str,
    *,
    dtype: torch.dtype | None = None,
    expected_channels: int | None = None,
    pad_to_max_length: bool = True,
) -> TextEncoder:
    """The text encoder a preset names: flan-t5-xl needs a local ``path``; tiny-t5 is built if none is given.

    ``expected_channels`` (the transformer's ``text_channels``) is checked against the encoder's d_model.
    ``pad_to_max_length=False`` runs T5 on the longest prompt of a batch instead of 512 positions
    (the official models keep True, as the official code pads).
    """
    if preset_text_encoder == TINY_T5_NAME:
        folder: str | os.PathLike[str] = path if path is not None else ensure_tiny_t5()
    elif preset_text_encoder in FLAN_T5_NAMES:
        if path is None:
            raise ValueError(f"text encoder {preset_text_encoder!r} needs a local folder path (e.g. a "
                             "downloaded google/flan-t5-xl); none was given and nothing is downloaded")
        folder = path
    else:
        known = ", ".join((*FLAN_T5_NAMES, TINY_T5_NAME))
        raise ValueError(f"unknown text encoder {preset_text_encoder!r}; known: {known}")
    encoder = T5TextEncoder(folder, device=device, dtype=dtype, pad_to_max_length=pad_to_max_length)
    if expected_channels is not None and encoder.d_model != expected_channels:
        raise ValueError(f"text encoder in {str(encoder.path)!r} has d_model {encoder.d_model}, "
                         f"but the transformer expects {expected_channels} text channels")
    return encoder
