"""Our modules' state dicts against the official key manifests (tests/fixtures/manifests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_loader.manifest import HEADER, main, manifest_text

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
CASES = [("infinity-2b", False, "infinity_2b"), ("infinity-8b", False, "infinity_8b"),
         ("infinity-2b", True, "vae_2b"), ("infinity-8b", True, "vae_8b")]


def _rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == HEADER
    return [line.split("\t") for line in lines[1:]]


@pytest.mark.parametrize(("preset", "vae", "name"), CASES)
def test_param_rows_match_reference(preset: str, vae: bool, name: str) -> None:
    ours = _rows(manifest_text(preset, vae))
    ref = _rows((FIXTURES / f"{name}.keys.tsv").read_text())
    params = lambda rows: [(r[0], r[1]) for r in rows if r[3] == "param"]
    assert params(ours) == params(ref)


@pytest.mark.parametrize(("preset", "vae", "name"), CASES)
def test_manifest_is_byte_identical(preset: str, vae: bool, name: str) -> None:
    assert manifest_text(preset, vae) == (FIXTURES / f"{name}.keys.tsv").read_text()


def test_cli_prints_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny-8b", "--vae"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert ["quantizer.lfq.mask", "14", "int64", "buffer", "int64"] in rows
    assert all(r[4] == "float32" for r in rows if r[2] == "float32")


def test_tiny_transformer_inference_dtypes() -> None:
    rows = _rows(manifest_text("tiny-2b"))
    for key, _, dtype, _, infer in rows:
        assert infer == ("bfloat16" if key.startswith("block_chunks.") else dtype)
