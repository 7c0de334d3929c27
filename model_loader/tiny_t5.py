"""A tiny, deterministic T5 encoder plus word-level tokenizer, written as a real HF folder.

``build_tiny_t5`` writes ``config.json``, ``model.safetensors`` and a ``tokenizer.json`` /
``tokenizer_config.json`` pair, so the result loads through exactly the same
``AutoTokenizer`` / ``T5EncoderModel`` code path as flan-t5-xl. It backs the "tiny-t5"
text encoder of the tiny presets and the tests. Same arguments -> byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

logger = logging.getLogger(__name__)

TINY_T5_FORMAT_VERSION = 1
"""Bump when the file layout or the init scheme changes (it is part of the cache key)."""

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Ids 0, 1, 2 as in T5 (pad 0, eos 1, unk 2)."""

_WORD_GROUPS: tuple[str, ...] = (
    # function words
    "a an the this that these those some any each every all both no not and or but with without "
    "of in on at to from by for into onto over under above below behind between near next beside "
    "around through across along against inside outside upon within as than then there here "
    "is are was were be been being has have had do does did can could will would should may might "
    "it its he she they them their his her we our you your i my me one two three four five six "
    "seven eight nine ten many few several more most less much very too so just only also same other "
    "another which who what where when how while",
    # colours and tones
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet indigo "
    "teal turquoise gold golden silver beige maroon navy olive lime crimson scarlet coral salmon "
    "lavender tan ivory cream khaki dark light bright pale deep pastel neon vivid muted colorful "
    "colourful monochrome transparent",
    # shapes
    "circle circles square squares triangle triangles rectangle rectangles oval ovals ellipse star "
    "stars heart hearts diamond diamonds hexagon hexagons pentagon octagon cross crosses ring rings "
    "dot dots line lines arrow arrows shape shapes disc disk cube sphere cone cylinder pyramid spiral "
    "curve wave blob polygon crescent",
    # positions and layout
    "top bottom left right center centre middle corner corners edge edges side sides upper lower "
    "front back foreground background row column grid diagonal horizontal vertical centered "
    "far close",
    # sizes and amounts
    "small large big tiny huge medium little giant thin thick wide narrow tall short long "
    "half full double single size sized",
    # patterns, textures and materials
    "stripes striped stripe checkered checkerboard checks dotted spotted spots plain solid pattern "
    "patterned gradient noise noisy smooth rough textured texture outline outlined filled empty "
    "hollow shiny matte glossy metallic wooden wood glass stone paper fabric",
    # common nouns for pictures
    "image picture photo photograph painting drawing sketch illustration render art artwork poster "
    "logo icon portrait landscape scene view sky sun moon cloud clouds rain snow water sea ocean "
    "river lake beach mountain mountains hill forest tree trees flower flowers grass field garden "
    "road street city building house room window door wall floor table chair bed lamp book car "
    "boat train plane bird birds cat cats dog dogs horse fish cow man woman person people child "
    "girl boy face eyes hand hands hair head fire light shadow night day morning evening sunset "
    "sunrise space planet earth world",
    # verbs, adjectives, style words
    "sitting standing walking running flying floating lying holding looking made covered surrounded "
    "filled painted drawn shown placed arranged beautiful old new young happy sad cute simple "
    "detailed realistic abstract minimal minimalist modern vintage soft hard hot cold warm cool "
    "clean high low quality style digital oil watercolor cartoon photorealistic sharp blurry "
    "good",
    # punctuation and digits (the pre-tokenizer isolates each of them)
    ", . ! ? ; : - ' \" ( ) / & + 0 1 2 3 4 5 6 7 8 9",
)


def default_vocab() -> list[str]:
    """Special tokens followed by the fixed word list, de-duplicated in first-seen order."""
    seen: dict[str, None] = dict.fromkeys(SPECIAL_TOKENS)
    for group in _WORD_GROUPS:
        for word in group.split():
            seen.setdefault(word.lower(), None)
    return list(seen)


def build_word_tokenizer(vocab: Sequence[str], *, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: NFKC, lower-case; split on whitespace, punctuation, digits; ``</s>`` appended."""
    vocab = list(vocab)
    if tuple(vocab[:3]) != SPECIAL_TOKENS:
        raise ValueError(f"vocab must start with {SPECIAL_TOKENS}, got {vocab[:3]}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate entries")
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    eos_id = vocab.index(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=model_max_length, padding_side="right",
    )


def tiny_t5_config(vocab_size: int, d_model: int = 256) -> T5Config:
    """Flan-style (gated-gelu, untied) T5 shrunk to d_model with 2 layers and 4 heads."""
    if d_model % 4:
        raise ValueError(f"d_model must be divisible by 4 heads, got {d_model}")
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )


@torch.no_grad()
def _seeded_init(model: T5EncoderModel, seed: int) -> None:
    """Fill every parameter from one seeded generator in name order (independent of HF's init code)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("layer_norm.weight"):
            param.fill_(1.0)
            continue
        if param.ndim != 2:
            raise ValueError(f"unexpected parameter {name} of shape {tuple(param.shape)}")
        if "embed" in name or name == "shared.weight":
            std = 1.0
        elif "relative_attention_bias" in name:
            std = 0.5
        else:
            std = 1.0 / math.sqrt(param.shape[1])  # fan_in of a Linear (out, in) weight
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def tiny_t5_key(*, d_model: int = 256, seed: int = 0, vocab: Sequence[str] | None = None) -> str:
    """Short content hash of the build arguments (the cache folder suffix)."""
    words = list(vocab) if vocab is not None else default_vocab()
    blob = json.dumps({"v": TINY_T5_FORMAT_VERSION, "d": d_model, "seed": seed, "vocab": words})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_t5(
    folder: str | Path, *, d_model: int = 256, seed: int = 0, vocab: Sequence[str] | None = None,
) -> Path:
    """Write a random-init (seeded) T5 encoder and its word-level tokenizer into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    words = list(vocab) if vocab is not None else default_vocab()
    tokenizer = build_word_tokenizer(words)
    model = T5EncoderModel(tiny_t5_config(len(words), d_model)).to(torch.float32).eval()
    _seeded_init(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("built tiny-t5 (d_model=%d, vocab=%d, seed=%d) in %s", d_model, len(words), seed, out)
    return out
