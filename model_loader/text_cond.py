"""Text conditioning as the transformer consumes it: per-prompt token features and lengths."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextCond:
    """Encoder features of B prompts, padded to the longest: features_BTC float32, lens_B int64.

    Rows beyond a prompt's length are zero and are never attended to. The official code
    packs the same data as (kv_compact (sum lens, C), cu_seqlens); ``from_packed`` and
    ``to_packed`` convert.
    """

    features_BTC: torch.Tensor
    lens_B: torch.Tensor

    def __post_init__(self) -> None:
        if self.features_BTC.ndim != 3:
            raise ValueError(f"features_BTC must be (B, T, C), got {tuple(self.features_BTC.shape)}")
        if self.lens_B.shape != (self.features_BTC.shape[0],):
            raise ValueError("lens_B must have one length per prompt")
        if int(self.lens_B.min()) < 1 or int(self.lens_B.max()) > self.features_BTC.shape[1]:
            raise ValueError(f"prompt lengths {self.lens_B.tolist()} outside 1..{self.features_BTC.shape[1]}")

    @property
    def batch_size(self) -> int:
        return self.features_BTC.shape[0]

    @staticmethod
    def from_packed(kv_compact: torch.Tensor, lens: list[int] | torch.Tensor) -> TextCond:
        lens = [int(x) for x in lens]
        t = max(lens)
        out = kv_compact.new_zeros((len(lens), t, kv_compact.shape[-1]), dtype=torch.float32)
        start = 0
        for i, n in enumerate(lens):
            out[i, :n] = kv_compact[start:start + n]
            start += n
        return TextCond(out, torch.tensor(lens, dtype=torch.long))

    def to_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_compact (sum lens, C), cu_seqlens int32 (B+1,))."""
        lens = self.lens_B.tolist()
        kv = torch.cat([self.features_BTC[i, :n] for i, n in enumerate(lens)])
        cu = F.pad(torch.cumsum(self.lens_B, 0), (1, 0)).to(torch.int32)
        return kv, cu

    def select(self, idx: list[int]) -> TextCond:
        lens = self.lens_B[idx]
        t = int(lens.max())
        return TextCond(self.features_BTC[idx, :t], lens)

    def to(self, device: torch.device | str) -> TextCond:
        return TextCond(self.features_BTC.to(device), self.lens_B.to(device))

    @staticmethod
    def cat(parts: list[TextCond]) -> TextCond:
        t = max(p.features_BTC.shape[1] for p in parts)
        feats = [F.pad(p.features_BTC, (0, 0, 0, t - p.features_BTC.shape[1])) for p in parts]
        return TextCond(torch.cat(feats), torch.cat([p.lens_B for p in parts]))

    def key_mask(self) -> torch.Tensor | None:
        """Bool (B, 1, 1, T) attention mask of real tokens, or None when no row is padded."""
        t = self.features_BTC.shape[1]
        if bool((self.lens_B == t).all()):
            return None
        ar = torch.arange(t, device=self.features_BTC.device)
        return (ar[None, :] < self.lens_B.to(ar.device)[:, None])[:, None, None, :]
