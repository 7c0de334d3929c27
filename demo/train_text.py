"""Pretrain the demo's tiny T5 on the grammar's captions (text only), then freeze it.

The real Infinity conditions on flan-t5-xl, pretrained on a web of text and frozen: its features
already say that "red" belongs to "circle" and both to "at the top left". The demo's T5 was
seeded random weights, frozen, and the binding probe (``demo.text_probe``) shows what that costs:
a reader trained on its features names held-out shapes' colours no better than from a bag of words.
So the encoder gets a pretraining of its own, on ``train`` captions only: a ``CellReader`` (one
query per grid cell and one for the background) must read every attribute of every cell from the
features; the reader is thrown away, the encoder is saved in the same Hugging Face folder format
(``T5TextEncoder`` loads it as before) and stays frozen while the transformer trains.

Before training, the query and key projections are scaled by ``qk_scale``: with the seeded
initialisation the attention logits have a standard deviation near 8 (T5 does not divide by
sqrt(d)), the softmax is saturated, and the relative position bias, a T5 encoder's only sense of
word order, gets almost no gradient.

    python -m demo.train text --out DIR --steps 1800 --batch-size 128 --lr 1e-3
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import T5EncoderModel

from model_loader.text_encoder import T5TextEncoder

from .dataset import draw_attributes
from .preset import DEMO_PRESET, build_demo_text_encoder
from .text_probe import CellReader, scene_targets
from .train_common import RunLog, TimeBudget, TrainArgs, args_dict, check_finite, lr_at, seed_everything

logger = logging.getLogger(__name__)

TEXT_DIR = "text_encoder"


def train_text_encoder(args: TrainArgs, *, qk_scale: float = 0.2, eval_captions: int = 1000) -> Path:
    """Writes ``<out>/text_encoder/`` (the pretrained T5 and its tokenizer) and ``<out>/text_encoder.json``
    (arguments, losses, and the reader's accuracy on train and held-out captions at the end)."""
    if not 0 < qk_scale <= 1:
        raise ValueError(f"qk_scale must be in (0, 1], got {qk_scale}")
    seed_everything(args.seed)
    folder = args.out / TEXT_DIR
    build_demo_text_encoder(folder)  # the seeded start (and the tokenizer)
    enc = T5TextEncoder(folder, device=args.device, dtype=torch.float32,
                        max_length=DEMO_PRESET.transformer.text_maxlen, pad_to_max_length=False)
    model: T5EncoderModel = enc.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".q.weight", ".k.weight")):
                p.mul_(qk_scale)
    model.train().requires_grad_(True)
    reader = CellReader(enc.d_model).to(args.device)
    params = [*model.parameters(), *reader.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    log = RunLog(args)
    budget = TimeBudget(args.minutes)

    def batch(scenes):
        ids_BL, mask_BL, _ = enc.tokenize([s.caption() for s in scenes])
        ids_BL, mask_BL = ids_BL.to(args.device), mask_BL.to(args.device)
        feats_BLC = model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return feats_BLC, mask_BL.bool(), scene_targets(scenes).to(args.device)

    step = 0
    while step < args.steps and not budget.over(step):
        scenes = [draw_attributes(args.data_seed, step * args.batch_size + i, "train") for i in range(args.batch_size)]
        loss = reader.loss(*batch(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.step()
        vals = {"loss": float(loss.detach()), "grad_norm": float(norm)}
        check_finite(vals, step)
        log.record(step, **vals)
        args = budget.fit(step, args, log)
        step += 1
    model.eval()
    reader.eval()
    with torch.no_grad():
        final = {split: reader.accuracy(*batch([draw_attributes(args.data_seed + 1, i, split)
                                                for i in range(eval_captions)]))
                 for split in ("train", "heldout")}
    logger.info("reader accuracy after %d steps: %s", step, final)
    model.save_pretrained(folder, safe_serialization=True)  # the tokenizer files stay as the seeded build wrote them
    meta = {"args": args_dict(args), "qk_scale": qk_scale, "reader_accuracy": final, **log.summary()}
    (args.out / "text_encoder.json").write_text(json.dumps(meta, indent=1))
    return folder
