"""Does the text encoder's output say which words belong together? A binding probe.

A caption names up to three shapes, each by its colour, kind, size and texture, and places each in
a cell ("a large red circle at the top left and a small blue square at the center ..."). The
transformer reads those features through cross-attention from image tokens that know where they
are. So the probe does the same: a small reader with one learned query per grid cell (and one for
the background) attends twice over the frozen features and must name the colour and kind of the
shape in its cell, or "none". It is trained on ``train`` captions and scored on ``heldout``
captions, whose (shape, colour) and (shape, position) pairs it never saw: a reader can only score
there if the features bind each shape's words to its position, rather than letting it memorise
word combinations.

Reference rows put numbers on the ends of that scale: ``embed`` is the encoder's own word
embeddings without any context (a bag of words: nothing is bound), ``embed+pos`` the same plus a
sinusoidal absolute position per token (binding is readable, by position).

    python -m demo.evaluate text <weights dir> [--steps 3000] [--references]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_loader.text_encoder import T5TextEncoder

from .dataset import COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, SceneSpec, draw_attributes

PROBE_SEED = 0
N_CELLS = len(POSITIONS)

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input ids (B, L), attention mask (B, L)) -> features (B, L, C)."""


SIZE_NAMES = tuple(SIZES)


@dataclass(frozen=True)
class SceneTargets:
    """What a caption states, per grid cell (0 = empty cell, else 1 + the index) and for the background."""

    colour_BN: torch.Tensor
    kind_BN: torch.Tensor
    size_BN: torch.Tensor
    texture_BN: torch.Tensor
    background_B: torch.Tensor
    bg_texture_B: torch.Tensor

    def take(self, idx_B: torch.Tensor) -> SceneTargets:
        """The rows ``idx_B`` (a batch of the captions these targets were made from)."""
        return SceneTargets(*(getattr(self, f.name)[idx_B] for f in fields(self)))

    def to(self, device: torch.device | str) -> SceneTargets:
        return SceneTargets(*(getattr(self, f.name).to(device) for f in fields(self)))

    def per_cell(self) -> dict[str, torch.Tensor]:
        return {"colour": self.colour_BN, "kind": self.kind_BN, "size": self.size_BN, "texture": self.texture_BN}


def scene_targets(scenes: list[SceneSpec]) -> SceneTargets:
    cells = torch.zeros(4, len(scenes), N_CELLS, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for s in scene.shapes:
            cell = POSITIONS.index(s.position)
            cells[:, b, cell] = torch.tensor([1 + COLOURS.index(s.colour), 1 + SHAPES.index(s.shape),
                                              1 + SIZE_NAMES.index(s.size), 1 + TEXTURES.index(s.texture)])
    return SceneTargets(*cells, torch.tensor([COLOURS.index(s.background) for s in scenes]),
                        torch.tensor([TEXTURES.index(s.bg_texture) for s in scenes]))


class CellReader(nn.Module):
    """One query per grid cell and one for the background; two rounds of cross-attention and MLP
    over the features (projected to ``channels``); a head per attribute."""

    def __init__(self, in_channels: int, channels: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, channels)
        self.query_NC = nn.Parameter(torch.randn(N_CELLS + 1, channels) * 0.02)
        self.kv_norm = nn.LayerNorm(channels)
        self.attn = nn.ModuleList(nn.MultiheadAttention(channels, heads, batch_first=True) for _ in range(2))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(),
                          nn.Linear(channels, channels)) for _ in range(2))
        self.cell_heads = nn.ModuleDict({
            "colour": nn.Linear(channels, 1 + len(COLOURS)), "kind": nn.Linear(channels, 1 + len(SHAPES)),
            "size": nn.Linear(channels, 1 + len(SIZE_NAMES)), "texture": nn.Linear(channels, 1 + len(TEXTURES))})
        self.background = nn.Linear(channels, len(COLOURS))
        self.bg_texture = nn.Linear(channels, len(TEXTURES))

    def forward(self, feats_BLC: torch.Tensor, mask_BL: torch.Tensor) -> dict[str, torch.Tensor]:
        kv_BLC = self.kv_norm(self.proj(feats_BLC))
        x_BNC = self.query_NC[None].expand(feats_BLC.shape[0], -1, -1)
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            x_BNC = x_BNC + attn(x_BNC, kv_BLC, kv_BLC, key_padding_mask=~mask_BL, need_weights=False)[0]
            x_BNC = x_BNC + mlp(x_BNC)
        cells_BNC, bg_BC = x_BNC[:, :N_CELLS], x_BNC[:, N_CELLS]
        return {**{k: h(cells_BNC) for k, h in self.cell_heads.items()},
                "background": self.background(bg_BC), "bg_texture": self.bg_texture(bg_BC)}

    def loss(self, feats_BLC: torch.Tensor, mask_BL: torch.Tensor, t: SceneTargets) -> torch.Tensor:
        """Sum of the cross-entropies of every attribute (empty cells count: "none" is a class)."""
        out = self(feats_BLC, mask_BL)
        total = sum(F.cross_entropy(out[k].flatten(0, 1), v.flatten()) for k, v in t.per_cell().items())
        return total + F.cross_entropy(out["background"], t.background_B) + \
            F.cross_entropy(out["bg_texture"], t.bg_texture_B)

    @torch.no_grad()
    def accuracy(self, feats_BLC: torch.Tensor, mask_BL: torch.Tensor, t: SceneTargets) -> dict[str, float]:
        """Rates over the shapes a caption states (colour, kind, size, texture), over the empty
        cells (read as empty), and over captions (background colour)."""
        out = self(feats_BLC, mask_BL)
        shape_BN = t.colour_BN > 0
        acc = {k: (out[k].argmax(-1) == v)[shape_BN].float().mean() for k, v in t.per_cell().items()}
        acc["empty"] = (out["colour"].argmax(-1) == 0)[~shape_BN].float().mean()
        acc["background"] = (out["background"].argmax(-1) == t.background_B).float().mean()
        return {k: round(float(v), 3) for k, v in acc.items()}


def _features(encoder: T5TextEncoder, feature_fn: FeatureFn, scenes: list[SceneSpec],
              chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every caption padded to the encoder's ``max_length`` (B, L, C) and the mask (B, L)."""
    feats, masks = [], []
    for i in range(0, len(scenes), chunk):
        ids_BL, mask_BL, _ = encoder.tokenize([s.caption() for s in scenes[i:i + chunk]])
        with torch.no_grad():
            f_BLC = feature_fn(ids_BL.to(encoder.device), mask_BL.to(encoder.device)).float().cpu()
        pad = encoder.max_length - f_BLC.shape[1]
        feats.append(F.pad(f_BLC, (0, 0, 0, pad)))
        masks.append(F.pad(mask_BL.bool(), (0, pad)))
    return torch.cat(feats), torch.cat(masks)


def feature_fns(encoder: T5TextEncoder) -> dict[str, FeatureFn]:
    """``t5`` (the encoder as the model uses it) and the two reference rows (module docstring)."""
    model = encoder.model

    def t5(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state

    def embed(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        return model.encoder.final_layer_norm(model.shared(ids_BL))

    def embed_pos(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        e_BLC = embed(ids_BL, mask_BL)
        c = e_BLC.shape[-1]
        angle_LK = torch.arange(ids_BL.shape[1], device=ids_BL.device)[:, None] * torch.exp(
            -torch.arange(0, c, 2, device=ids_BL.device) * math.log(1e4) / c)[None]
        pos_LC = torch.stack([angle_LK.sin(), angle_LK.cos()], dim=-1).flatten(1)
        return e_BLC + pos_LC[None].to(e_BLC.dtype)

    return {"t5": t5, "embed": embed, "embed+pos": embed_pos}


def probe_report(encoder: T5TextEncoder, *, steps: int = 3000, train_captions: int = 20000,
                 test_captions: int = 2000, batch: int = 256, references: bool = False,
                 names: list[str] | None = None) -> dict:
    """Held-out (and train) accuracy of a ``CellReader`` on each feature set (``names``; default
    ``t5``, with ``references`` the two reference rows too): colour and kind of the shapes, and
    whether empty cells are read as empty. Seeded: the same call gives the same numbers."""
    if steps < 1 or train_captions < 1 or test_captions < 1:
        raise ValueError("steps, train_captions and test_captions must be >= 1")
    train = [draw_attributes(PROBE_SEED, i, "train") for i in range(train_captions)]
    test = [draw_attributes(PROBE_SEED, i, "heldout") for i in range(test_captions)]
    fns = feature_fns(encoder)
    names = names or (["t5", "embed", "embed+pos"] if references else ["t5"])
    unknown = sorted(set(names) - set(fns))
    if unknown:
        raise ValueError(f"names: unknown feature sets {unknown}; known: {sorted(fns)}")
    report: dict = {"steps": steps, "train_captions": train_captions, "heldout_captions": test_captions}
    for name in names:
        report[name] = _probe_one(encoder, fns[name], train, test, steps, batch)
    return report


def _probe_one(encoder: T5TextEncoder, fn: FeatureFn, train: list[SceneSpec], test: list[SceneSpec],
               steps: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(PROBE_SEED)
    torch.manual_seed(PROBE_SEED)
    x_BLC, m_BL = _features(encoder, fn, train)
    targets = scene_targets(train)
    reader = CellReader(x_BLC.shape[-1])
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(len(train), (batch,), generator=gen)
        loss = reader.loss(x_BLC[idx], m_BL[idx], targets.take(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    reader.eval()
    n = min(len(train), len(test))  # train rows: the features computed above, not encoded again
    return {"train": reader.accuracy(x_BLC[:n], m_BL[:n], targets.take(torch.arange(n))),
            "heldout": reader.accuracy(*_features(encoder, fn, test), scene_targets(test))}
