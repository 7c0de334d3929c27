"""Token layouts of one scale and the preallocated self-attention KV cache.

Rows (N) are sequences in the batch: B conditional rows followed by the unconditional rows
still running. A scale either computes every token of every row (dense: x is (N, L, C)), or a
different number of tokens per row (packed: x is (1, T, C) with T = sum of the row lengths,
rows back to back). Attention always runs on the padded view (N, Lmax, ...); linear layers
run on whatever layout x has, so packed rows waste no FLOPs on padding. A varlen attention
kernel can replace the padded view on GPU: the packed layout and ``cu_seqlens`` are here.

The cache holds, per block, K and V of every computed token at the token's true position in
the sequence order; rows may have different lengths (pruned scales append only kept tokens),
tracked by ``lens_N`` and masked in attention. Buffers are allocated once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScaleLayout:
    """Which tokens each row computes at one scale."""

    n_rows: int
    lens: list[int]
    """Tokens per row."""
    dense: bool
    """x is a rectangle (N, Lmax, C) (equal row lengths, or padded); else packed (1, T, C)."""
    row_T: torch.Tensor | None = None
    """Packed only: row of each packed token."""
    col_T: torch.Tensor | None = None
    """Packed only: index of each packed token within its row."""

    @property
    def uniform(self) -> bool:
        """Every row has the same token count (a padded rectangle is dense but not uniform)."""
        return len(set(self.lens)) <= 1

    @property
    def max_len(self) -> int:
        return max(self.lens) if self.lens else 0

    @property
    def total(self) -> int:
        return sum(self.lens)

    @staticmethod
    def dense_layout(n_rows: int, length: int) -> ScaleLayout:
        return ScaleLayout(n_rows=n_rows, lens=[length] * n_rows, dense=True)

    @staticmethod
    def from_lens(lens: list[int], device: torch.device) -> ScaleLayout:
        """Dense when every row has the same length, packed otherwise."""
        if len(set(lens)) <= 1:
            return ScaleLayout.dense_layout(len(lens), lens[0] if lens else 0)
        row_T, col_T = packed_indices(lens, device)
        return ScaleLayout(n_rows=len(lens), lens=list(lens), dense=False, row_T=row_T, col_T=col_T)

    def row_slices(self) -> list[tuple[slice, ...]]:
        """Index of each row's tokens in a tensor laid out like x with heads first: (N|1, H, L|T, Dh)."""
        if self.dense:
            return [(slice(r, r + 1),) for r in range(self.n_rows)]
        out, start = [], 0
        for n in self.lens:
            out.append((slice(0, 1), slice(None), slice(start, start + n)))
            start += n
        return out

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """int32 (N+1,) cumulative lengths, the varlen-kernel view of the packed layout."""
        out = torch.zeros(self.n_rows + 1, dtype=torch.int32, device=device)
        out[1:] = torch.cumsum(torch.tensor(self.lens, device=device), 0)
        return out

    def to_padded(self, x_1TX: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) packed -> (N, Lmax, ...) padded with zeros. Dense layouts pass through."""
        if self.dense:
            return x_1TX
        out = x_1TX.new_zeros((self.n_rows, self.max_len, *x_1TX.shape[2:]))
        out[self.row_T, self.col_T] = x_1TX[0]
        return out

    def per_token(self, t_N1X: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-row tensor (N, 1, ...) to the layout of x: as is when dense, else (1, T, ...)."""
        if self.dense:
            return t_N1X
        return t_N1X[self.row_T, 0].unsqueeze(0)


def packed_indices(lens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, index within row) of every token when rows of ``lens`` are laid back to back."""
    lens_t = torch.tensor(lens, device=device)
    row_T = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    col_T = torch.arange(int(lens_t.sum()), device=device) - (torch.cumsum(lens_t, 0) - lens_t)[row_T]
    return row_T, col_T


class KVCache:
    """Preallocated per-block K/V buffers of shape (N, H, S, Dh), written in place."""

    def __init__(self, *, depth: int, n_rows: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, storage: KVCache | None = None) -> None:
        """``storage``: a larger cache whose buffers this one views (first ``n_rows`` rows, first
        ``capacity`` slots) instead of allocating its own: fixed addresses for every batch shape."""
        shape = (n_rows, num_heads, capacity, head_dim)
        if storage is not None:
            k_full, v_full, rows_full = storage._full
            if n_rows > rows_full or capacity > storage.capacity:
                raise ValueError(f"storage holds {rows_full} rows x {storage.capacity} slots, "
                                 f"not {n_rows} x {capacity}")
            self.k = [b[:n_rows, :, :capacity] for b in k_full]
            self.v = [b[:n_rows, :, :capacity] for b in v_full]
        else:
            # zeros, not empty: masked slots still enter q.k, and a NaN bit pattern would survive the mask
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self._full = (list(self.k), list(self.v), n_rows)  # select_rows narrows views; reset restores
        self.n_rows = n_rows
        self.capacity = capacity
        self.lens_N = torch.zeros(n_rows, dtype=torch.long, device=device)
        self._lens = [0] * n_rows  # host copy: lengths decide shapes, so keep them off the device
        self._layout: ScaleLayout | None = None
        self.mode = "slice"
        self._slot_T: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return len(set(self._lens)) <= 1

    @property
    def lens(self) -> tuple[int, ...]:
        """Cached tokens per row (host copy)."""
        return tuple(self._lens)

    def reset(self) -> None:
        """Empty every row and restore all rows, to reuse the same buffers for a new batch (their
        addresses stay fixed, which captured CUDA graphs rely on). Old contents are never read:
        every read stops at the lengths written since."""
        k, v, n_rows = self._full
        self.k, self.v, self.n_rows = list(k), list(v), n_rows
        self._lens = [0] * n_rows
        self.lens_N = torch.zeros(n_rows, dtype=torch.long, device=self.lens_N.device)
        self._layout = None
        self.mode = "slice"

    def begin_scale(self, layout: ScaleLayout) -> None:
        """Fix where this scale's tokens go; every block then calls ``write_read`` or ``write_row``.

        Modes: 'slice' (equal rows on an equal cache: one slice, no mask), 'masked' (a padded
        rectangle: tokens scattered to each row's next slots, keys masked), 'rows' (packed or
        unequal rows: each row written and attended on its own, the varlen-kernel equivalent).
        """
        if layout.n_rows != self.n_rows:
            raise ValueError(f"layout has {layout.n_rows} rows, cache has {self.n_rows}")
        new_lens = [a + b for a, b in zip(self._lens, layout.lens, strict=True)]
        if max(new_lens) > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({max(new_lens)})")
        self._layout = layout
        self._slot_T = None
        self._mask = None
        if layout.uniform and self.uniform:
            self.mode = "slice"
        elif layout.dense and not layout.uniform:
            self.mode = "masked"
            device = self.lens_N.device
            self._row_T, self._col_T = packed_indices(layout.lens, device)
            self._slot_T = self.lens_N[self._row_T] + self._col_T
            s_max = max(new_lens)
            new_lens_t = torch.tensor(new_lens, device=device)
            self._mask = (torch.arange(s_max, device=device)[None, :] < new_lens_t[:, None])[:, None, None, :]
        else:
            self.mode = "rows"
        self._new_lens = new_lens

    def write_row(self, layer: int, row: int, k_1HLD: torch.Tensor, v_1HLD: torch.Tensor):
        """'rows' mode: store one row's K/V after its cached tokens; return its (1, H, S_row, Dh) K and V."""
        start = self._lens[row]
        end = start + k_1HLD.shape[2]
        self.k[layer][row, :, start:end] = k_1HLD[0]
        self.v[layer][row, :, start:end] = v_1HLD[0]
        return self.k[layer][row:row + 1, :, :end], self.v[layer][row:row + 1, :, :end]

    def write_read(self, layer: int, k_NHLD: torch.Tensor, v_NHLD: torch.Tensor):
        """Store this scale's K/V (padded view) and return (K, V, key_mask) over all cached tokens."""
        layout = self._layout
        k_buf, v_buf = self.k[layer], self.v[layer]
        if self.mode == "slice":
            start = self._lens[0]
            end = start + layout.lens[0]
            k_buf[:, :, start:end] = k_NHLD
            v_buf[:, :, start:end] = v_NHLD
            return k_buf[:, :, :end], v_buf[:, :, :end], None
        row_T, col_T, slot_T = self._row_T, self._col_T, self._slot_T
        k_buf[row_T, :, slot_T] = k_NHLD.transpose(1, 2)[row_T, col_T]
        v_buf[row_T, :, slot_T] = v_NHLD.transpose(1, 2)[row_T, col_T]
        s_max = self._mask.shape[-1]
        return k_buf[:, :, :s_max], v_buf[:, :, :s_max], self._mask

    def end_scale(self) -> None:
        self._lens = self._new_lens
        self.lens_N = torch.tensor(self._lens, dtype=torch.long, device=self.lens_N.device)
        self._layout = None

    def select_rows(self, keep_rows: list[int]) -> None:
        """Keep only ``keep_rows`` (in that order), compacting the buffers in place."""
        if keep_rows == list(range(self.n_rows)):
            return
        idx = torch.tensor(keep_rows, dtype=torch.long, device=self.lens_N.device)
        s = max(self._lens) if self._lens else 0
        n = len(keep_rows)
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                buf[:n, :, :s] = buf[idx, :, :s]
                bufs[i] = buf[:n]
        self._lens = [self._lens[r] for r in keep_rows]
        self.lens_N = self.lens_N[idx]
        self.n_rows = n
