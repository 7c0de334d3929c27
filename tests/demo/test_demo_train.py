"""3-step smoke runs of the demo VAE and transformer training at tiny sizes (finite losses, files written)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from demo.train_common import TrainArgs
from demo.train_transformer import train_transformer
from demo.train_vae import train_vae
from model_loader.checkpoint_io import read_safetensors
from model_loader.configs import TransformerConfig, VAEConfig

TINY_VAE = VAEConfig(codebook_bits=8, patch_size=8, encoder_ch_mult=(1, 1, 1, 1),
                     decoder_ch_mult=(1, 1, 1, 1), base_ch=24, num_res_blocks=1, norm_groups=8)
TINY_TF = TransformerConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, token_bits=8, text_channels=256,
                            text_maxlen=64)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo_vae")
    train_vae(TrainArgs(out=out, steps=3, batch_size=2, lr=1e-3), TINY_VAE, crop=64)
    return out


def _finite_history(path: Path) -> list[dict]:
    meta = json.loads(path.read_text())
    assert meta["steps_done"] == 3
    for row in meta["history"]:
        assert all(math.isfinite(v) for v in row.values())
    return meta["history"]


def test_vae_three_steps(vae_dir: Path) -> None:
    _finite_history(vae_dir / "vae.json")
    sd = read_safetensors(vae_dir / "vae.safetensors")
    assert "quantize.lfq.mask" in sd and "quantizer.lfq.mask" in sd
    assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())


def test_transformer_three_steps(vae_dir: Path, tmp_path: Path) -> None:
    args = TrainArgs(out=tmp_path, steps=3, batch_size=2, lr=1e-3)
    tf = train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE, cond_drop=0.5,
                           text_encoder_dir=tmp_path / "text_encoder")
    hist = _finite_history(tmp_path / "transformer.json")
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=0.1)  # near-uniform bits at init
    assert all(torch.isfinite(p).all() for p in tf.parameters())
    assert set(read_safetensors(tmp_path / "transformer.safetensors")) == set(tf.state_dict())
    assert (tmp_path / "text_encoder" / "tokenizer.json").is_file()


def test_transformer_profile_names_the_phases_of_a_step(vae_dir: Path, tmp_path: Path) -> None:
    """``--profile``: steps 25-29 under torch.profiler, the step's phases and the ops inside them in the table."""
    args = TrainArgs(out=tmp_path, steps=30, batch_size=2, lr=1e-3)
    train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE,
                      text_encoder_dir=tmp_path / "text_encoder", profile=tmp_path / "prof" / "steps.txt")
    table = (tmp_path / "prof" / "steps.txt").read_text()
    assert table.startswith("# steps 25..29:")
    for name in ("data", "teacher_forcing", "text", "forward_loss", "backward_step", "aten::mm"):
        assert name in table, name
    assert table.count("# sorted by") == 2


def test_vae_gate_report(vae_dir: Path) -> None:
    """The recipe's VAE gate reads the trained file and scores its reconstructions (a 3-step VAE scores low)."""
    from demo.evaluate import vae_report
    from model_loader.vae import BSQVAE

    vae = BSQVAE(TINY_VAE)
    vae.load_state_dict(read_safetensors(vae_dir / "vae.safetensors"))
    r = vae_report(vae.eval(), n=4, batch=2)
    assert r["images"] == 4 and math.isfinite(r["psnr_db"]) and 0.0 <= r["adherence"] < 0.8


def test_per_scale_loss_weighs_scales_equally() -> None:
    """Scale 0 (1 token) all wrong, scale 1 (4 tokens) all right: the per-scale mean is half the wrong-token CE."""
    from demo.train_transformer import bitwise_loss

    labels_BLD = torch.zeros(1, 5, 3, dtype=torch.long)
    logits_BLD2 = torch.zeros(1, 5, 3, 2)
    logits_BLD2[..., 0], logits_BLD2[..., 1] = 4.0, -4.0  # every bit predicts 0 confidently
    logits_BLD2[:, 0, :, 0], logits_BLD2[:, 0, :, 1] = -4.0, 4.0  # token 0 predicts 1: wrong
    wrong, right = F.cross_entropy(torch.tensor([[-4.0, 4.0]]), torch.tensor([0])), \
        F.cross_entropy(torch.tensor([[4.0, -4.0]]), torch.tensor([0]))
    per_token, acc_BL = bitwise_loss(logits_BLD2.view(1, 5, 6), labels_BLD)
    per_scale, _ = bitwise_loss(logits_BLD2.view(1, 5, 6), labels_BLD, [1, 4])
    assert per_token == pytest.approx(float(wrong + 4 * right) / 5, rel=1e-5)
    assert per_scale == pytest.approx(float(wrong + right) / 2, rel=1e-5)
    last3, _ = bitwise_loss(logits_BLD2.view(1, 5, 6), labels_BLD, [1, 4], last_scale_weight=3.0)
    assert last3 == pytest.approx(float(wrong + 3 * right) / 4, rel=1e-5)
    assert acc_BL.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]


def test_worker_processes_draw_the_same_batches() -> None:
    """--workers only moves rendering into other processes: same images, same captions, same order."""
    from demo.train_common import train_batches

    inline = list(train_batches(3, 2, data_seed=7, workers=0))
    ahead = list(train_batches(3, 2, data_seed=7, workers=2))
    assert len(ahead) == 3
    for (a_img, a_cap), (b_img, b_cap) in zip(inline, ahead, strict=True):
        assert a_cap == b_cap
        assert torch.equal(a_img, b_img)
    assert inline[0][1] != inline[1][1]
    # a resumed run starts at its step, in both paths
    for workers in (0, 2):
        resumed = list(train_batches(3, 2, data_seed=7, workers=workers, start=1))
        assert [cap for _, cap in resumed] == [cap for _, cap in inline[1:]]
        assert torch.equal(resumed[-1][0], inline[-1][0])


def test_time_budget_fits_the_step_count(vae_dir: Path, tmp_path: Path) -> None:
    """A budget far shorter than --steps ends the run after the probe, and the log says how many ran."""
    args = TrainArgs(out=tmp_path, steps=10_000, batch_size=2, lr=1e-3, minutes=1e-4)
    train_vae(args, TINY_VAE, crop=64)
    meta = json.loads((tmp_path / "vae.json").read_text())
    assert meta["steps_done"] == 20  # the probe; the 6 ms budget leaves room for no more
    assert meta["args"]["steps"] == 20 and meta["args"]["minutes"] == 1e-4


def test_bitwise_self_correction_labels_fix_the_fed_bits() -> None:
    """Flip probability 0 is the plain quantizer; flipped bits change the residual, and each later
    scale's labels are the signs of what the *flipped* earlier scales left over."""
    from demo.train_transformer import quantize_with_flips
    from model_loader.vae import BSQVAE, bits_to_codes, resize_codes

    grids = [(1, 1), (2, 2), (4, 4)]
    z = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = BSQVAE(TINY_VAE).quantize_multiscale(z, grids)[1]
    labels, fed = quantize_with_flips(z, grids, torch.zeros(3), torch.Generator().manual_seed(1))
    for a, b, c in zip(plain, labels, fed, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)

    flip_B = torch.tensor([0.0, 0.5, 1.0])
    labels, fed = quantize_with_flips(z, grids, flip_B, torch.Generator().manual_seed(1))
    assert torch.equal(fed[0][2], 1 - labels[0][2]) and torch.equal(fed[0][0], labels[0][0])
    frac = (fed[2][1] != labels[2][1]).float().mean()
    assert 0.3 < float(frac) < 0.7
    residual = z - resize_codes(bits_to_codes(fed[0]), (4, 4))
    expect = (F.interpolate(residual, size=(2, 2), mode="area").permute(0, 2, 3, 1) > 0).to(torch.uint8)
    assert torch.equal(labels[1], expect)
    assert not torch.equal(labels[1][2], plain[1][2])  # row 2 had every bit flipped: different residual


def test_transformer_step_with_self_correction(vae_dir: Path, tmp_path: Path) -> None:
    args = TrainArgs(out=tmp_path, steps=3, batch_size=2, lr=1e-3)
    train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE, flip_max=0.3,
                      text_encoder_dir=tmp_path / "text_encoder")
    meta = json.loads((tmp_path / "transformer.json").read_text())
    assert meta["args"]["extra"]["flip_max"] == 0.3
    _finite_history(tmp_path / "transformer.json")


def test_replay_buffer_ring_and_batches() -> None:
    """Fresh rows come first in a batch, the rest are drawn from what is stored; a full ring
    overwrites its oldest rows (and their captions)."""
    from demo.train_common import ReplayBuffer

    buf = ReplayBuffer(5, (2,), "cpu")
    first = buf.add(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), ["a", "b", "c"])
    assert first.tolist() == [0, 1, 2] and buf.size == 3
    slots = buf.batch(6, first[1:], torch.Generator().manual_seed(0))
    assert slots[:2].tolist() == [1, 2] and len(slots) == 6 and int(slots.max()) < 3
    rows, caps = buf.take(slots)
    assert caps == [["a", "b", "c"][i] for i in slots.tolist()] and torch.equal(rows[:, 0], slots.float())
    again = buf.add(torch.tensor([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]), ["d", "e", "f"])
    assert again.tolist() == [3, 4, 0] and buf.size == 5 and buf.added == 6
    rows, caps = buf.take(torch.tensor([0, 4]))
    assert caps == ["f", "e"] and rows[:, 1].tolist() == [5.0, 4.0]
    assert len(buf.batch(2, torch.arange(5), None)) == 2  # more fresh rows than the batch: the first ones
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, (2,), "cpu")


def test_background_batches_hand_over_everything_in_order() -> None:
    """The thread-fed stream gives every batch once, in order, and an empty list at its end;
    an error while rendering reaches the training loop."""
    from demo.train_common import BackgroundBatches

    stream = BackgroundBatches(iter([(torch.full((1,), float(i)), [str(i)]) for i in range(5)]), depth=2)
    got = []
    while batch := stream.ready(block=True):
        got.extend(batch)
    assert [c for _, c in got] == [["0"], ["1"], ["2"], ["3"], ["4"]] and stream.ready(block=True) == []
    stream.close()

    def broken():
        yield torch.zeros(1), ["ok"]
        raise RuntimeError("renderer died")

    stream = BackgroundBatches(broken())
    with pytest.raises(RuntimeError, match="renderer died"):
        while stream.ready(block=True):
            pass
    stream.close()


def test_transformer_steps_from_the_replay_buffer(vae_dir: Path, tmp_path: Path) -> None:
    """--replay trains on buffered latents (the teacher-forcing inputs come from the same encoder):
    the run finishes its steps, and its log says how many images were rendered and trained. Here
    with the GPU recipe's bf16 autocast too."""
    args = TrainArgs(out=tmp_path, steps=3, batch_size=2, lr=1e-3)
    train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE, flip_max=0.2,
                      replay=16, amp="bf16", text_encoder_dir=tmp_path / "text_encoder")
    meta = json.loads((tmp_path / "transformer.json").read_text())
    _finite_history(tmp_path / "transformer.json")
    assert meta["args"]["extra"]["replay"] == 16 and meta["args"]["extra"]["amp"] == "bf16"
    assert 2 <= meta["args"]["extra"]["replay_images_rendered"] <= 6
    assert meta["args"]["extra"]["replay_images_trained"] == 6


def test_teacher_forcing_from_latents_matches_from_images(vae_dir: Path) -> None:
    from demo.dataset import batch_tensors, make_split
    from demo.train_transformer import load_frozen_vae, teacher_forcing_batch, teacher_forcing_from_latent

    vae = load_frozen_vae(vae_dir / "vae.safetensors", TINY_VAE)
    img, _ = batch_tensors(make_split(2, 0))
    grids = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
    a = teacher_forcing_batch(vae, img, grids)
    b = teacher_forcing_from_latent(vae, vae.encode(img), grids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_model_report_captions_from_start_with_their_own_seeds() -> None:
    """``--start k`` scores caption k with seed k: the same image the report from 0 drew for it
    (the mean adherence of two one-image reports is the two-image report's)."""
    from demo.evaluate import model_report
    from demo.model import WEIGHTS_DIR

    both = model_report(WEIGHTS_DIR, n=2, batch=1)
    first, second = (model_report(WEIGHTS_DIR, n=1, batch=1, start=k) for k in (0, 1))
    assert second["start"] == 1 and both["cfg"] == first["cfg"]
    assert both["adherence"] == pytest.approx((first["adherence"] + second["adherence"]) / 2)


def test_scale_code_sum_of_the_quantizer_bits_is_its_f_hat(vae_dir: Path) -> None:
    """The teacher diagnosis decodes sums of per-scale bits: with the quantizer's own bits the sum
    is the quantizer's f_hat (so its "vae" row is the VAE reconstruction)."""
    from demo.dataset import batch_tensors, make_split
    from demo.evaluate import sum_scale_codes
    from model_loader.vae import BSQVAE

    vae = BSQVAE(TINY_VAE)
    vae.load_state_dict(read_safetensors(vae_dir / "vae.safetensors"))
    img, _ = batch_tensors(make_split(2, 0))
    grids = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
    f_hat, bits = vae.quantize_multiscale(vae.eval().encode(img), grids)
    assert torch.allclose(sum_scale_codes(bits, grids), f_hat, atol=1e-6)
    flipped = [bits[0] ^ 1, *bits[1:]]
    assert not torch.allclose(sum_scale_codes(flipped, grids), f_hat, atol=1e-3)


def test_teacher_report_on_the_shipped_model(tmp_path: Path) -> None:
    """The shipped transformer predicts the true bits well above chance at every scale; its "vae"
    row is the VAE reconstruction's adherence on the same images; the figure has a column per scale."""
    from PIL import Image

    from demo.evaluate import load_vae, teacher_report, vae_report
    from demo.model import WEIGHTS_DIR

    r = teacher_report(WEIGHTS_DIR, n=4, batch=2, figure=tmp_path / "scales.png")
    assert len(r["bit_accuracy_per_scale"]) == len(r["grids"]) == 7
    assert all(0.75 < a <= 1.0 for a in r["bit_accuracy_per_scale"])
    assert set(r["adherence"]) == {"vae", "model_all", *(f"model_scale{k}" for k in range(7))}
    assert r["adherence"]["vae"]["adherence"] == pytest.approx(vae_report(load_vae(WEIGHTS_DIR), n=4)["adherence"])
    assert Image.open(tmp_path / "scales.png").size == (7 * 128, 4 * 128)


def test_time_budget_stops_a_run_whose_steps_slowed_down() -> None:
    """The fit assumes the probe's pace; steps that slow down afterwards run past the budget, so
    ``over`` ends the run (to be saved) once the budget and its grace are spent, never during the probe."""
    from demo.train_common import RunLog, TimeBudget

    now = [0.0]
    budget = TimeBudget(1.0, probe=4, grace=0.05, clock=lambda: now[0])  # 60 s
    args = TrainArgs(out=Path("."), steps=1000, batch_size=1, lr=1e-3)
    log = RunLog(args)
    log.step_times = [1.0] * 4
    now[0] = 4.0
    args = budget.fit(3, args, log)
    assert args.steps == 4 + 56  # 56 s left at 1 s a step
    now[0] = 62.0  # steps slowed down: 40 steps took 58 s
    assert not budget.over(40)  # within 5 % of 60 s
    now[0] = 63.5
    assert budget.over(41)
    assert not budget.over(3) and not TimeBudget(None).over(10_000)


def _tiny_run(out: Path, vae_dir: Path, steps: int, **kw) -> torch.nn.Module:
    args = TrainArgs(out=out, steps=steps, batch_size=2, lr=1e-3)
    return train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE, cond_drop=0.5,
                             per_scale_loss=True, flip_max=0.3, **kw)


def test_a_run_split_and_resumed_ends_bit_for_bit_where_the_whole_run_ends(vae_dir: Path, tmp_path: Path) -> None:
    """--resume: weights, AdamW state, the flip/text-drop generator, the LR schedule and the batches all
    carry over, so 6 steps run as 2 + 2 + 2 (stopped twice) equal 6 steps in one go, and the log is whole."""
    whole = _tiny_run(tmp_path / "whole", vae_dir, 6)
    _tiny_run(tmp_path / "split", vae_dir, 6, stop_after=2)
    _tiny_run(tmp_path / "split", vae_dir, 6, stop_after=4, resume=True)
    split = _tiny_run(tmp_path / "split", vae_dir, 6, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    a, b = (json.loads((tmp_path / d / "transformer.json").read_text()) for d in ("whole", "split"))
    assert [r["step"] for r in b["history"]] == list(range(6))
    assert [r["loss"] for r in b["history"]] == [r["loss"] for r in a["history"]]
    assert b["args"]["extra"]["resumed_at"] == [2, 4]
    # and the comparison can fail: a run resumed without its optimizer state drifts
    _tiny_run(tmp_path / "first", vae_dir, 6, stop_after=2)
    restarted = _tiny_run(tmp_path / "restarted", vae_dir, 4, init=tmp_path / "first" / "transformer.safetensors")
    pairs = zip(whole.state_dict().values(), restarted.state_dict().values(), strict=True)
    assert any(not torch.equal(x, y) for x, y in pairs)


def test_resume_refuses_other_settings_a_finished_run_and_a_missing_checkpoint(vae_dir: Path,
                                                                                tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no checkpoint .*transformer\.ckpt"):
        _tiny_run(tmp_path, vae_dir, 4, resume=True)
    _tiny_run(tmp_path, vae_dir, 4, stop_after=1)
    args = TrainArgs(out=tmp_path, steps=4, batch_size=2, lr=2e-3)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.001, this run 0\.002"):
        train_transformer(args, vae_dir / "vae.safetensors", cfg=TINY_TF, vae_cfg=TINY_VAE, cond_drop=0.5,
                          per_scale_loss=True, flip_max=0.3, resume=True)
    with pytest.raises(ValueError, match="flip_max: checkpoint 0.3, this run 0.0"):
        train_transformer(TrainArgs(out=tmp_path, steps=4, batch_size=2, lr=1e-3), vae_dir / "vae.safetensors",
                          cfg=TINY_TF, vae_cfg=TINY_VAE, cond_drop=0.5, per_scale_loss=True, resume=True)
    with pytest.raises(ValueError, match="init and resume"):
        _tiny_run(tmp_path, vae_dir, 4, resume=True, init=tmp_path / "transformer.safetensors")
    _tiny_run(tmp_path, vae_dir, 4, resume=True)
    with pytest.raises(ValueError, match="already ran all 4 steps"):
        _tiny_run(tmp_path, vae_dir, 4, resume=True)


def test_a_resumed_time_budget_keeps_the_schedule_and_only_stops() -> None:
    from demo.train_common import RunLog, TimeBudget

    now = [0.0]
    budget = TimeBudget(1.0, clock=lambda: now[0], first_step=100, refit=False)
    args = TrainArgs(out=Path("."), steps=1000, batch_size=1, lr=1e-3)
    log = RunLog(args)
    log.step_times = [1.0] * 30
    assert budget.fit(119, args, log) is args  # no refit at the probe
    now[0] = 59.0
    assert not budget.over(101)
    now[0] = 60.5  # no grace: a resumed part stops at its budget, to save before an outer timeout
    assert budget.over(101) and not budget.over(100)  # at least one step first


def test_sigterm_stops_a_run_after_its_step_and_saves_it_to_resume(vae_dir: Path, tmp_path: Path) -> None:
    """A `timeout` (SIGTERM) or Ctrl-C mid-run: the step under way finishes, the run saves its
    checkpoint and exits cleanly, and --resume goes on from there."""
    import signal
    import subprocess
    import sys
    import threading

    script = (
        "import logging, sys, torch\n"
        "from pathlib import Path\n"
        "from demo.train_common import TrainArgs\n"
        "from demo.train_transformer import train_transformer\n"
        "from tests.demo.test_demo_train import TINY_TF, TINY_VAE\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "torch.set_num_threads(1)\n"
        "out, vae = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "train_transformer(TrainArgs(out=out, steps=100_000, batch_size=2, lr=1e-3, log_every=1), vae,\n"
        "                  cfg=TINY_TF, vae_cfg=TINY_VAE)\n"
        "print('returned', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(vae_dir / "vae.safetensors")],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    guard = threading.Timer(120, proc.kill)  # a run that never logs its steps must not hang the suite
    guard.start()
    seen = []
    try:
        for line in proc.stdout:  # the run logs every step; stop it once two have run
            seen.append(line)
            if "step 1/100000" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[0]
    finally:
        guard.cancel()
        proc.kill()
    assert proc.returncode == 0, "".join(seen) + rest
    assert "SIGTERM: stopping after this step" in rest and "returned" in rest
    ckpt = torch.load(tmp_path / "transformer.ckpt", weights_only=True)
    meta = json.loads((tmp_path / "transformer.json").read_text())
    assert ckpt["step"] == meta["steps_done"] >= 2
    assert ckpt["steps"] == 100_000
    resumed_to = ckpt["step"] + 1
    train_transformer(TrainArgs(out=tmp_path, steps=100_000, batch_size=2, lr=1e-3), vae_dir / "vae.safetensors",
                      cfg=TINY_TF, vae_cfg=TINY_VAE, resume=True, stop_after=resumed_to)
    meta = json.loads((tmp_path / "transformer.json").read_text())
    assert [r["step"] for r in meta["history"]] == list(range(resumed_to))


def test_cli_needs_steps_except_to_resume_a_transformer_run() -> None:
    from demo.train import parse_args

    assert parse_args(["transformer", "--out", "w", "--resume"]).steps is None
    assert parse_args(["vae", "--out", "w", "--steps", "3"]).steps == 3
    for argv in (["vae", "--out", "w"], ["transformer", "--out", "w"], ["vae", "--out", "w", "--resume"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
