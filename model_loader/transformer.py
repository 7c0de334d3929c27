"""The Infinity transformer, inference only: text conditioning, one scale forward, logits.

The model knows nothing of CFG, sampling or pruning: the generation loops (model_loader.generate
for the baseline, pruning.loop for the engine) decide which rows and tokens run. Attribute
and parameter names, and their registration order, reproduce the official state dict.

Shape letters: N rows (B conditional rows, then the unconditional rows still running),
L tokens per row at a scale, T packed tokens, C width, Tt text tokens, V logits per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .configs import TransformerConfig
from .kv_cache import KVCache, ScaleLayout
from .layers import (
    AdaLNBeforeHead,
    BlockChunk,
    CrossAttnBlock,
    RMSNorm,
    SelfAttnContext,
    TextAttentivePool,
    TextKV,
    no_autocast,
)
from .text_cond import TextCond


@dataclass
class TextState:
    """Per-row conditioning computed once per batch from the text."""

    sos_ND: torch.Tensor
    """Pooled text (start token and head condition)."""
    gss_N16C: torch.Tensor
    """Shared AdaLN output (gamma1, gamma2, scale1, scale2, shift1, shift2) before each block's offset."""
    ca_kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per block: cross-attention K and V of the text, (N, H, Tt, Dh) bf16."""
    text_mask: torch.Tensor | None
    """(N, 1, 1, Tt) bool, None when no row is padded."""
    text_lens: list[int]

    def select_rows(self, rows: list[int]) -> TextState:
        idx = torch.tensor(rows, device=self.sos_ND.device)
        mask = None if self.text_mask is None else self.text_mask[idx]
        return TextState(self.sos_ND[idx], self.gss_N16C[idx],
                         [(k[idx], v[idx]) for k, v in self.ca_kv], mask, [self.text_lens[r] for r in rows])

    def block_text(self, i: int) -> TextKV:
        return TextKV(self.ca_kv[i][0], self.ca_kv[i][1], self.text_mask, self.text_lens)


class InfinityTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, ct5 = cfg.embed_dim, cfg.text_channels
        # direct parameters first: they lead the official state dict
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.text_norm = RMSNorm(ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(ct5, c, cfg.pool_num_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.lvl_embed = nn.Embedding(cfg.num_levels, c)
        self.word_embed = nn.Linear(cfg.token_bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.num_logits)
        per = cfg.blocks_per_chunk
        blocks = [CrossAttnBlock(c, cfg.num_heads, cfg.ffn_hidden, cfg.norm_eps) for _ in range(cfg.depth)]
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i * per:(i + 1) * per]) for i in range(cfg.block_chunks))

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    # ------------------------------------------------------------------ text

    def uncond_text(self, lens_B: torch.Tensor) -> TextCond:
        """The learned unconditional text: the first len_b rows of cfg_uncond per prompt."""
        t = int(lens_B.max())
        feats = self.cfg_uncond[:t].float().unsqueeze(0).repeat(len(lens_B), 1, 1)
        ar = torch.arange(t, device=feats.device)
        feats = feats * (ar[None, :, None] < lens_B.to(feats.device)[:, None, None])
        return TextCond(feats, lens_B.clone())

    def prepare_text(self, text: TextCond) -> TextState:
        """Pool, AdaLN source and per-block cross-attention K/V for every row of ``text``."""
        mask = text.key_mask()
        t = self.text_norm(text.features_BTC)
        pool = self.text_proj_for_sos.ca
        sos = pool.pool(pool.project_kv(t), mask)
        ca_src = self.text_proj_for_ca(t)
        with no_autocast(sos):
            gss = self.shared_ada_lin(sos.float()).float().reshape(-1, 1, 6, self.cfg.embed_dim)
        ca_kv = [blk.ca.project_kv(ca_src) for blk in self.blocks]
        return TextState(sos, gss, ca_kv, mask, text.lens_B.tolist())

    def start_tokens(self, sos_ND: torch.Tensor) -> torch.Tensor:
        """Scale-0 input: pooled text plus the learned start position, (N, 1, C)."""
        return sos_ND.unsqueeze(1) + self.pos_start

    # ------------------------------------------------------------------ scales

    def embed_tokens(self, feat_NLd: torch.Tensor) -> torch.Tensor:
        return self.word_embed(feat_NLd)

    def forward_scale(self, x: torch.Tensor, scale_idx: int, text: TextState, layout: ScaleLayout,
                      rope: torch.Tensor, cache: KVCache | None, attn_mask: torch.Tensor | None = None,
                      lvl_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Run all blocks on the tokens of one scale; returns the last block's hidden state.

        x is (N, L, C) for a dense layout or (1, T, C) packed. ``rope`` holds cos/sin for
        the tokens in the padded view. The level embedding of ``scale_idx`` (or per token
        ``lvl_idx`` in the training forward) is added before the first block.
        """
        sa_ctx = SelfAttnContext(layout, rope, cache, attn_mask)
        if cache is not None:
            cache.begin_scale(layout)
        x = self.run_blocks(x, scale_idx, text, sa_ctx, lvl_idx)
        if cache is not None:
            cache.end_scale()
        return x

    def run_blocks(self, x: torch.Tensor, scale_idx: int, text: TextState, sa_ctx: SelfAttnContext,
                   lvl_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Level embedding and every block, with the cache already between ``begin_scale`` and
        ``end_scale``: device work only, no host bookkeeping (what a CUDA graph captures)."""
        lvl = self.lvl_embed.weight[scale_idx] if lvl_idx is None else self.lvl_embed(lvl_idx)
        # official: in-place add into x, so a bf16 x stays bf16 (rounded once)
        x = (x.float() + lvl).to(x.dtype)
        gss = text.gss_N16C
        for i, blk in enumerate(self.blocks):
            x = blk(x, gss, sa_ctx, i, text.block_text(i))
        return x

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Head in float32 with autocast off; cond is per row (N, C) or per token (1, T, C)."""
        with no_autocast(h):
            return self.head(self.head_nm(h.float(), cond.float()))

    # ------------------------------------------------------------------ training path

    def forward_train(self, text: TextCond, x_BLd_wo_prefix: torch.Tensor,
                      grids: tuple[tuple[int, int], ...], rope: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of all scales at once with a block-causal mask: (B, L, V).

        ``x_BLd_wo_prefix`` holds the inputs of scales 1..K-1 (the start token is added here).
        """
        b = text.batch_size
        state = self.prepare_text(text)
        x = torch.cat([self.start_tokens(state.sos_ND).float(),
                       self.embed_tokens(x_BLd_wo_prefix.float()).float()], dim=1)
        sizes = [h * w for h, w in grids]
        scale_of_token = torch.repeat_interleave(torch.arange(len(grids), device=x.device),
                                                 torch.tensor(sizes, device=x.device))
        mask = (scale_of_token[:, None] >= scale_of_token[None, :])[None, None]
        layout = ScaleLayout.dense_layout(b, x.shape[1])
        h = self.forward_scale(x, 0, state, layout, rope, None, attn_mask=mask,
                               lvl_idx=scale_of_token.unsqueeze(0))
        return self.logits(h, state.sos_ND.unsqueeze(1))


def build_transformer(cfg: TransformerConfig, device: torch.device | str = "meta") -> InfinityTransformer:
    with torch.device(device):
        return InfinityTransformer(cfg)


def head_cond(layout: ScaleLayout, sos_ND: torch.Tensor) -> torch.Tensor:
    """Head condition in the layout of the hidden state: (N, 1, C) dense or (1, T, C) packed."""
    return layout.per_token(sos_ND.unsqueeze(1))

