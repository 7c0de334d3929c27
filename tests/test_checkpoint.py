"""Checkpoint readers and the strict loader, on the tiny presets with random weights (CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from model_loader import build_transformer, build_vae, get_preset
from model_loader.checkpoint import (
    CheckpointError,
    load_model,
    load_transformer,
    load_vae,
    save_safetensors,
    target_dtype,
)


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def tr2b() -> nn.Module:
    return _randomised(build_transformer(get_preset("tiny-2b").transformer, device="cpu"), 0)


@pytest.fixture(scope="module")
def vae2b() -> nn.Module:
    return _randomised(build_vae(get_preset("tiny-2b").vae, device="cpu"), 1)


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the official inference dtypes (blocks bf16)."""
    return {k: v.to(target_dtype(k, v.dtype, "official", "transformer")) for k, v in sd.items()}


def write_sharded(sd: dict[str, torch.Tensor], folder: Path, fmt: str, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(n):
        part = {k: sd[k].contiguous() for k in keys[i::n]}
        name = f"model-{i + 1:05d}-of-{n:05d}.{fmt}"
        if fmt == "safetensors":
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map |= {k: name for k in part}
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _assert_same(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def _mapping_of(ptr: int) -> str:
    """The file backing the address ``ptr`` in this process ('' for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else ""
    return ""


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("layout", ["pth", "trainer_pth", "bin_shards", "safetensors_shards", "safetensors"])
def test_round_trip_float32(tmp_path: Path, tr2b: nn.Module, layout: str) -> None:
    sd = _sd(tr2b)
    if layout == "pth":
        path = tmp_path / "t.pth"
        torch.save(sd, path)
    elif layout == "trainer_pth":
        path = tmp_path / "ckpt.pth"
        torch.save({"trainer": {"gpt_fsdp": sd, "step": 3}, "args": {"lr": 1e-4}}, path)
    elif layout == "bin_shards":
        path = write_sharded(sd, tmp_path / "w", "bin")
    elif layout == "safetensors_shards":
        path = write_sharded(sd, tmp_path / "w", "safetensors")
    else:
        path = save_safetensors(tr2b, tmp_path / "t.safetensors")
    _assert_same(load_transformer("tiny-2b", path, dtype_policy="float32"), sd)


def test_official_dtype_policy(tmp_path: Path, tr2b: nn.Module) -> None:
    torch.save(_sd(tr2b), tmp_path / "t.pth")
    model = load_transformer("tiny-2b", tmp_path / "t.pth")
    _assert_same(model, _official(_sd(tr2b)))
    assert model.block_chunks[0].module[0].sa.zero_k_bias.dtype == torch.bfloat16
    assert model.pos_start.dtype == torch.float32 and not model.pos_start.requires_grad
    assert not model.training


def test_bfloat16_policy_and_load_model(tmp_path: Path, tr2b: nn.Module, vae2b: nn.Module) -> None:
    save_safetensors(tr2b, tmp_path / "t.safetensors")
    torch.save({"vae": _sd(vae2b), "ema": {}}, tmp_path / "v.pth")
    m = load_model("tiny-2b", transformer_path=tmp_path / "t.safetensors", vae_path=tmp_path / "v.pth",
                   dtype_policy="bfloat16")
    assert m.compute_dtype == torch.bfloat16
    assert {t.dtype for t in m.transformer.parameters()} == {torch.bfloat16}
    assert m.vae.quantizer.lfq.mask.dtype == torch.int64
    m32 = load_model("tiny-2b", transformer_path=tmp_path / "t.safetensors", vae_path=tmp_path / "v.pth",
                     dtype_policy="float32")
    assert m32.compute_dtype == torch.float32
    _assert_same(m32.vae, _sd(vae2b))


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin_shards"])
def test_no_copy_when_dtype_matches(tmp_path: Path, tr2b: nn.Module, fmt: str) -> None:
    sd = _official(_sd(tr2b))
    if fmt == "safetensors":
        path = save_safetensors(sd, tmp_path / "t.safetensors")
    elif fmt == "pth":
        path = tmp_path / "t.pth"
        torch.save(sd, path)
    else:
        path = write_sharded(sd, tmp_path / "w", "bin", n=2)
    model = load_transformer("tiny-2b", path)
    _assert_same(model, sd)
    w = model.block_chunks[1].module[0].ffn.fc1.weight
    assert w.dtype == torch.bfloat16
    backing = _mapping_of(w.data_ptr())
    assert backing and Path(backing).parent.resolve() == (tmp_path if fmt != "bin_shards" else tmp_path / "w")


def test_safetensors_tensors_share_the_file_mapping(tmp_path: Path, tr2b: nn.Module) -> None:
    path = save_safetensors(_official(_sd(tr2b)), tmp_path / "t.safetensors")
    model = load_transformer("tiny-2b", path)
    ptrs = {p.untyped_storage().data_ptr() for p in model.block_chunks.parameters()}
    assert len(ptrs) == 1  # one mapping of the whole file, no per-tensor copies
    assert next(iter(model.block_chunks.parameters())).untyped_storage().nbytes() == path.stat().st_size


# ----------------------------------------------------------------------------- VAE

def test_vae_legacy_names_are_mapped(tmp_path: Path, vae2b: nn.Module) -> None:
    sd = _sd(vae2b)
    legacy = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
              .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}
    assert "encoder.conv_in.weight" in legacy and "decoder.norm_out.bias" in legacy
    assert any(k.endswith("nin_shortcut.weight") for k in legacy)
    torch.save({"vae": legacy}, tmp_path / "v.pth")
    _assert_same(load_vae("tiny-2b", tmp_path / "v.pth"), sd)


def test_wrong_vae_for_preset(tmp_path: Path) -> None:
    vae8 = _randomised(build_vae(get_preset("tiny-8b").vae, device="cpu"), 2)
    path = save_safetensors(vae8, tmp_path / "vae8.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_vae("tiny-2b", path)
    msg = str(ei.value)
    assert "VAE has 14 code bits but preset tiny-2b expects 32" in msg
    assert str(path) in msg
    rep = ei.value.report
    assert rep is not None and rep.mis_shaped["decoder.conv_in.conv.weight"][1][1] == 14
    assert "... and" in msg  # long lists are truncated with a count


def test_vae_masks_recreated_and_checked(tmp_path: Path, vae2b: nn.Module) -> None:
    sd = _sd(vae2b)
    del sd["quantize.lfq.mask"]
    save_file(sd, str(tmp_path / "v.safetensors"))
    vae = load_vae("tiny-2b", tmp_path / "v.safetensors")
    assert torch.equal(vae.quantize.lfq.mask, 2 ** torch.arange(31, -1, -1))
    sd["quantize.lfq.mask"] = torch.arange(32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="quantize.lfq.mask: this constant buffer must hold powers"):
        load_vae("tiny-2b", tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- key errors

def _expect_error(tmp_path: Path, sd: dict[str, torch.Tensor], pattern: str) -> CheckpointError:
    path = tmp_path / "t.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=pattern) as ei:
        load_transformer("tiny-2b", path)
    assert str(path) in str(ei.value)
    return ei.value


def test_extra_key(tmp_path: Path, tr2b: nn.Module) -> None:
    err = _expect_error(tmp_path, {**_sd(tr2b), "blocks.0.extra": torch.zeros(3)}, "1 unexpected keys")
    assert err.report is not None and err.report.unexpected == ["blocks.0.extra"]


def test_missing_key(tmp_path: Path, tr2b: nn.Module) -> None:
    sd = _sd(tr2b)
    del sd["block_chunks.1.module.1.ffn.fc2.weight"]
    err = _expect_error(tmp_path, sd, "block_chunks.1.module.1.ffn.fc2.weight")
    assert err.report is not None and err.report.missing == ["block_chunks.1.module.1.ffn.fc2.weight"]


def test_mis_shaped_key(tmp_path: Path, tr2b: nn.Module) -> None:
    sd = _sd(tr2b)
    sd["cfg_uncond"] = sd["cfg_uncond"][:100]
    err = _expect_error(tmp_path, sd, r"cfg_uncond: expected 512x256, found 100x256")
    assert err.report is not None and err.report.mis_shaped == {"cfg_uncond": ((512, 256), (100, 256))}


def test_wrong_transformer_has_top_line(tmp_path: Path) -> None:
    tr8 = build_transformer(get_preset("tiny-8b").transformer, device="cpu")
    _expect_error(tmp_path, _sd(tr8), "transformer has 56 bits per token but preset tiny-2b expects 32")


def test_nonzero_zero_k_bias(tmp_path: Path, tr2b: nn.Module) -> None:
    sd = _sd(tr2b)
    sd["text_proj_for_sos.ca.zero_k_bias"] = torch.ones_like(sd["text_proj_for_sos.ca.zero_k_bias"])
    _expect_error(tmp_path, sd, "zero_k_bias: this constant buffer must hold zeros")


def test_legacy_transformer_entries_dropped(tmp_path: Path, tr2b: nn.Module) -> None:
    sd = {**_sd(tr2b), "lvl_1L": torch.zeros(1, 10), "attn_bias_for_masking": torch.zeros(1, 1, 4, 4),
          "Infinity_visible_kvlen": torch.tensor(3), "Infinity_invisible_qlen": torch.tensor(4)}
    torch.save(sd, tmp_path / "t.pth")
    _assert_same(load_transformer("tiny-2b", tmp_path / "t.pth", dtype_policy="float32"), _sd(tr2b))


# ----------------------------------------------------------------------------- file errors

def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_transformer("tiny-2b", tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*weights_dir"):
        load_transformer("tiny-2b", tmp_path / "weights_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no index json"):
        load_transformer("tiny-2b", tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_missing_shard(tmp_path: Path, tr2b: nn.Module, fmt: str) -> None:
    folder = write_sharded(_sd(tr2b), tmp_path / "w", fmt)
    (folder / f"model-00002-of-00003.{fmt}").unlink()
    with pytest.raises(CheckpointError, match=f"missing: model-00002-of-00003.{fmt}"):
        load_transformer("tiny-2b", folder)


def test_index_naming_files_outside_its_folder_is_refused(tmp_path: Path, tr2b: nn.Module) -> None:
    folder = write_sharded(_sd(tr2b), tmp_path / "w", "safetensors")
    index = next(folder.glob("*.index.json"))
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    for elsewhere in ("../elsewhere.safetensors", str(tmp_path / "abs.safetensors")):
        doc["weight_map"][first] = elsewhere
        index.write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match="names shard\\(s\\) outside its folder"):
            load_transformer("tiny-2b", folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_corrupted_file(tmp_path: Path, tr2b: nn.Module, fmt: str, damage: str) -> None:
    path = tmp_path / f"t.{fmt}"
    if fmt == "pth":
        torch.save(_sd(tr2b), path)
    else:
        save_safetensors(tr2b, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07garbage" * 1000)
    with pytest.raises(CheckpointError, match="could not read .*t\\." + fmt):
        load_transformer("tiny-2b", path)


class _Payload:
    """Pickles as a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


class _OsPayload:
    """Pickles as os.remove of a file: torch words a blocked module's global differently."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def __reduce__(self) -> tuple:
        return (os.remove, (str(self.victim),))


def test_pickle_with_code_is_refused(tmp_path: Path, tr2b: nn.Module) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**_sd(tr2b), "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to unpickle .*evil.pth"):
        load_transformer("tiny-2b", path)
    assert not marker.exists()
    victim = tmp_path / "keep-me"
    victim.write_text("x")
    torch.save({**_sd(tr2b), "payload": _OsPayload(victim)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil.pth: it references posix\.remove") as e:
        load_transformer("tiny-2b", path)
    assert victim.exists() and "weights_only" not in str(e.value).replace("(torch.load weights_only)", "")


def test_safetensors_under_a_pth_name_loads(tmp_path: Path, tr2b: nn.Module) -> None:
    sd = {k: v.clone() for k, v in _sd(tr2b).items()}
    save_file(sd, tmp_path / "t.pth")
    loaded = load_transformer("tiny-2b", tmp_path / "t.pth", dtype_policy="float32").state_dict()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in sd.items() if k in loaded)


def test_unknown_policy(tmp_path: Path, tr2b: nn.Module) -> None:
    torch.save(_sd(tr2b), tmp_path / "t.pth")
    with pytest.raises(ValueError, match="unknown dtype policy"):
        load_transformer("tiny-2b", tmp_path / "t.pth", dtype_policy="fp8")  # type: ignore[arg-type]


def test_weight_paths_are_checked_before_the_text_encoder_loads(tmp_path: Path) -> None:
    """A typo in a weight path is reported before flan-t5-xl (GBs) would be read: here the T5 folder
    does not exist either, and the error is about the weights."""
    from pruning.engine import Engine

    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*vae\.pth"):
        Engine.from_preset("infinity-2b", transformer_path=tmp_path / "t.pth", vae_path=tmp_path / "vae.pth",
                           text_encoder_path=tmp_path / "no-t5")
    with pytest.raises(ValueError, match="unknown dtype policy 'bf16'"):
        Engine.from_preset("infinity-2b", transformer_path=tmp_path / "t.pth", vae_path=tmp_path / "vae.pth",
                           text_encoder_path=tmp_path / "no-t5", dtype_policy="bf16")
