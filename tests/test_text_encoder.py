"""Tiny T5 text encoder: built for real, loaded through the same AutoTokenizer/T5EncoderModel path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_loader.text_cond import TextCond
from model_loader.text_encoder import T5TextEncoder, ensure_tiny_t5, load_text_encoder
from model_loader.tiny_t5 import build_tiny_t5, build_word_tokenizer, default_vocab

PROMPTS = [
    "a red circle at the top left on a blue background with stripes",
    "small green square",
    "A LARGE Yellow Triangle, bottom-right!",
    "",
]
WORD_COUNTS = [13, 3, 9, 0]  # words and punctuation marks; "bottom-right!" -> bottom - right !


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> T5TextEncoder:
    """Shorter padding than the official 512 keeps the CPU tests fast; the round-trip test uses 512."""
    return T5TextEncoder(tiny_dir, device="cpu", max_length=64)


def test_round_trip_shapes_lens_and_zero_padding(tiny_dir: Path) -> None:
    encoder = T5TextEncoder(tiny_dir, device="cpu")
    assert encoder.max_length == 512 and encoder.tokenizer.model_max_length == 512
    cond, truncated = encoder.encode_with_info(PROMPTS)
    assert isinstance(cond, TextCond)
    assert truncated == [False] * len(PROMPTS)
    assert cond.lens_B.dtype == torch.int64
    assert cond.lens_B.tolist() == [n + 1 for n in WORD_COUNTS]  # + </s>
    assert cond.features_BTC.dtype == torch.float32
    assert cond.features_BTC.shape == (len(PROMPTS), max(WORD_COUNTS) + 1, 256)
    assert encoder.d_model == 256
    for i, n in enumerate(cond.lens_B.tolist()):
        assert torch.all(cond.features_BTC[i, n:] == 0)
        real = cond.features_BTC[i, :n]
        assert torch.isfinite(real).all()
        assert (real.abs().sum(-1) > 0).all()


def test_tokenizer_round_trip_and_unknown_words(encoder: T5TextEncoder) -> None:
    tok = encoder.tokenizer
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    ids = tok("a zebra in a Purple quokka")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "<unk>", "in", "a", "purple", "<unk>", "</s>"]
    assert ids[1] == tok.unk_token_id == ids[5]
    # unknown words are still one token each and encode like any other word
    cond = encoder.encode(["a zebra quokka"])
    assert cond.lens_B.tolist() == [4]


def test_every_vocab_word_is_one_token() -> None:
    vocab = default_vocab()
    assert 300 <= len(vocab) <= 2000
    tok = build_word_tokenizer(vocab)
    for word in vocab[3:]:
        assert tok.tokenize(word) == [word], word
    for word in ("red", "circle", "top", "left", "background", "stripes", "large", "hexagon"):
        assert word in vocab


def test_deterministic_across_builds(tmp_path: Path, tiny_dir: Path, encoder: T5TextEncoder) -> None:
    other = build_tiny_t5(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    again = T5TextEncoder(other, device="cpu").encode(PROMPTS[:2])
    assert torch.equal(again.features_BTC, encoder.encode(PROMPTS[:2]).features_BTC)


def test_seed_changes_weights(tmp_path: Path, tiny_dir: Path) -> None:
    other = build_tiny_t5(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_batch_invariance(encoder: T5TextEncoder) -> None:
    batch = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = encoder.encode([prompt])
        n = int(alone.lens_B[0])
        assert int(batch.lens_B[i]) == n
        torch.testing.assert_close(batch.features_BTC[i, :n], alone.features_BTC[0], atol=1e-5, rtol=1e-5)


def test_padding_to_longest_matches_max_length(tiny_dir: Path, encoder: T5TextEncoder) -> None:
    short = T5TextEncoder(tiny_dir, device="cpu", max_length=64, pad_to_max_length=False)
    a, b = encoder.encode(PROMPTS), short.encode(PROMPTS)
    assert torch.equal(a.lens_B, b.lens_B)
    torch.testing.assert_close(a.features_BTC, b.features_BTC, atol=1e-5, rtol=1e-5)


def test_context_depends_on_other_words(encoder: T5TextEncoder) -> None:
    cond = encoder.encode(["red circle", "red square"])
    assert not torch.allclose(cond.features_BTC[0, 0], cond.features_BTC[1, 0])


def test_truncation_flag(tiny_dir: Path) -> None:
    enc = T5TextEncoder(tiny_dir, device="cpu", max_length=5)
    cond, truncated = enc.encode_with_info(["red circle", "one two three four", "one two three four five"])
    assert truncated == [False, False, True]
    assert cond.lens_B.tolist() == [3, 5, 5]
    assert cond.features_BTC.shape == (3, 5, 256)


@pytest.mark.parametrize("pad_to_max_length", [True, False])
def test_tokenize_matches_the_tokenizers_own_truncation_and_padding(tiny_dir: Path, pad_to_max_length: bool) -> None:
    """The single-pass ``tokenize`` gives exactly what ``tokenizer(..., truncation=True, padding=...)`` gives."""
    enc = T5TextEncoder(tiny_dir, device="cpu", max_length=6, pad_to_max_length=pad_to_max_length)
    prompts = ["red circle", "", "one two three four five", "one two three four five six seven eight",
               "a zebra in a purple quokka at the top left", "small green square"]
    ids_BL, mask_BL, truncated = enc.tokenize(prompts)
    ref = enc.tokenizer(prompts, max_length=6, truncation=True, return_tensors="pt",
                        padding="max_length" if pad_to_max_length else "longest")
    assert ids_BL.dtype == ref["input_ids"].dtype and mask_BL.dtype == ref["attention_mask"].dtype
    assert torch.equal(ids_BL, ref["input_ids"]) and torch.equal(mask_BL, ref["attention_mask"])
    assert truncated == [False, False, False, True, True, False]
    assert ids_BL.shape == (6, 6)  # the longest prompt is cut to max_length, so "longest" is 6 here too
    short_ids, _, _ = enc.tokenize(["red circle", "small green square"])
    assert short_ids.shape == ((2, 6) if pad_to_max_length else (2, 4))


def test_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-t5"
    with pytest.raises(FileNotFoundError, match="no-such-t5"):
        T5TextEncoder(missing, device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such-t5"):
        load_text_encoder("flan-t5-xl", str(missing), "cpu")


def test_missing_files_names_path_and_file(tmp_path: Path, tiny_dir: Path) -> None:
    partial = tmp_path / "partial-t5"
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="partial-t5.*model.safetensors"):
        T5TextEncoder(partial, device="cpu")


def test_factory_errors() -> None:
    with pytest.raises(ValueError, match="needs a local folder"):
        load_text_encoder("flan-t5-xl", None, "cpu")
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("clip-l", None, "cpu")


def test_factory_builds_tiny_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        tiny_dir: Path) -> None:
    monkeypatch.setenv("LDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    enc = load_text_encoder("tiny-t5", None, "cpu", expected_channels=256)
    assert isinstance(enc, T5TextEncoder)
    assert enc.path.parent == tmp_path / "cache" and enc.path.name.startswith("tiny-t5-")
    assert (enc.path / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert ensure_tiny_t5() == enc.path  # second call reuses the folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [enc.path.name]  # no temp folders left
    with pytest.raises(ValueError, match="expects 2048"):
        load_text_encoder("tiny-t5", str(enc.path), "cpu", expected_channels=2048)


def test_rejects_bad_prompts(encoder: T5TextEncoder) -> None:
    with pytest.raises(ValueError):
        encoder.encode([])
    with pytest.raises(ValueError):
        encoder.encode("a red circle")  # type: ignore[arg-type]


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = edit(load_file(str(dst / "model.safetensors")))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_weights_missing_or_misshaped_keys_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    """transformers would fill them with random values and only log it: silently wrong features."""
    missing = _copy_with_weights(tiny_dir, tmp_path / "missing",
                                 lambda sd: {k: v for k, v in sd.items() if "block.1." not in k})
    with pytest.raises(ValueError, match=r"weights in '.*missing' lack \d+ encoder key\(s\).*block\.1\.layer"):
        T5TextEncoder(missing, device="cpu", max_length=8)

    def narrow(sd: dict) -> dict:
        k = next(k for k in sd if k.endswith("block.0.layer.0.SelfAttention.q.weight"))
        return {**sd, k: sd[k][:, :10].contiguous()}

    shaped = _copy_with_weights(tiny_dir, tmp_path / "shaped", narrow)
    with pytest.raises(ValueError, match=r"SelfAttention\.q\.weight \(file \(\d+, 10\), model \(\d+, \d+\)\)"):
        T5TextEncoder(shaped, device="cpu", max_length=8)


def test_damaged_tokenizer_names_the_folder(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "t5")
    (tmp_path / "t5" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"could not load the T5 tokenizer from '.*t5'"):
        T5TextEncoder(tmp_path / "t5", device="cpu", max_length=8)


def test_a_full_t5_checkpoint_with_its_decoder_loads(tiny_dir: Path, tmp_path: Path) -> None:
    """flan-t5-xl's folder is a whole T5 (shared embedding saved once, decoder and lm_head too): the
    missing-key check must accept it, and the encoder must take the file's weights."""
    import shutil

    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    full = T5ForConditionalGeneration(T5Config.from_pretrained(tiny_dir))
    full.save_pretrained(tmp_path / "full")
    for f in tiny_dir.glob("tokenizer*"):
        shutil.copy(f, tmp_path / "full" / f.name)
    enc = T5TextEncoder(tmp_path / "full", device="cpu", max_length=8)
    ours, theirs = enc.model.state_dict(), full.encoder.state_dict()
    q = "block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(ours[f"encoder.{q}"], theirs[q])
    assert torch.equal(ours["shared.weight"], full.shared.weight)
