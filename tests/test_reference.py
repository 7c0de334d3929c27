"""Our model against outputs recorded from the official implementation (tiny 2B/8B fixtures)."""

import pytest

from model_loader.check_reference import main, run_checks


@pytest.mark.parametrize("fixture", ["tiny2b", "tiny8b"])
def test_matches_official_outputs(fixtures_dir, fixture):
    checks, rows = run_checks(fixtures_dir / "reference" / fixture)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, "\n".join(rows + failed)
    names = {c.name for c in checks}
    # every scale's bits were compared free-running (no early divergence), plus images and VAE
    assert {f"free-run bits s{i}" for i in range(7)} <= names
    assert {"image uint8", "tf_logits (training forward)", "VAE quantizer bits"} <= names


def test_cli_exit_status(fixtures_dir, tmp_path, capsys):
    assert main([str(fixtures_dir / "reference" / "tiny8b")]) == 0
    assert "29 passed, 0 failed" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 2
