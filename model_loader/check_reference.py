"""Compare our implementation with outputs recorded from the official code.

    python -m model_loader.check_reference DIR [--device cpu|cuda] [--precision float32|bfloat16]

DIR is laid out like ../shared/reference/tiny2b: config.json, transformer.safetensors,
vae.safetensors, inputs.safetensors, outputs.safetensors. Tolerances and procedure follow the
reference README section 5. Exit status 0 only if everything matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import load_transformer, load_vae
from .configs import ModelPreset, SamplingDefaults, TransformerConfig, VAEConfig
from .generate import build_text_rows, generate
from .layers import rope_tables
from .model import InfinityModel
from .sampling import SamplingParams
from .schedules import rope_positions
from .text_cond import TextCond
from .vae import bits_to_codes, resize_codes

LOGIT_ATOL = 2e-2
MARGIN = 2e-2


def preset_from_config(cfg: dict) -> ModelPreset:
    kw, der, va = cfg["transformer_kwargs_full"], cfg["transformer_derived"], cfg["vae_autoencoder_args"]
    tcfg = TransformerConfig(depth=kw["depth"], embed_dim=kw["embed_dim"], num_heads=kw["num_heads"],
                             block_chunks=kw["block_chunks"], token_bits=der["d_vae_tokens"],
                             text_channels=kw["text_channels"], text_maxlen=kw["text_maxlen"],
                             mlp_ratio=kw["mlp_ratio"], norm_eps=kw["norm_eps"])
    vcfg = VAEConfig(codebook_bits=va["codebook_dim"], patch_size=va["patch_size"],
                     encoder_ch_mult=tuple(va["encoder_ch_mult"]), decoder_ch_mult=tuple(va["decoder_ch_mult"]),
                     base_ch=va["base_ch"], num_res_blocks=va["num_res_blocks"])
    inf = cfg["inference"]
    return ModelPreset(name=cfg.get("fixture", "reference"), transformer=tcfg, vae=vcfg,
                       spatial_patchify=bool(kw["apply_spatial_patchify"]), pn=cfg["pn_schedule_key"],
                       sampling=SamplingDefaults(cfg=inf["cfg_list"][0], tau=inf["tau_list"][0]),
                       checkpoint_layout="safetensors")


def load_reference_model(ref_dir: Path, device: str, precision: str) -> tuple[InfinityModel, dict]:
    cfg = json.loads((ref_dir / "config.json").read_text())
    preset = preset_from_config(cfg)
    # the strict loader, as for real checkpoints; bfloat16 = the official policy (bf16 blocks)
    policy = "official" if precision == "bfloat16" else "float32"
    tf = load_transformer(preset, ref_dir / "transformer.safetensors", device=device, dtype_policy=policy)
    vae = load_vae(preset, ref_dir / "vae.safetensors", device=device, dtype_policy="float32")
    model = InfinityModel(preset, tf, vae,
                          compute_dtype=torch.bfloat16 if precision == "bfloat16" else torch.float32)
    return model, cfg


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, gate: bool = True) -> Check:
    err = (ours.float().cpu() - ref.float()).abs().max().item() if ref.numel() else 0.0
    return Check(name, err <= atol or not gate, f"max|d|={err:.3g} (atol {atol:g}{'' if gate else ', diagnostic'})")


def run_checks(ref_dir: Path, device: str = "cpu", precision: str = "float32") -> tuple[list[Check], list[str]]:
    model, cfg = load_reference_model(ref_dir, device, precision)
    inp, ref = load_file(str(ref_dir / "inputs.safetensors")), load_file(str(ref_dir / "outputs.safetensors"))
    tf = model.transformer
    grids = tuple((h, w) for _, h, w in cfg["scale_schedule"])
    text = TextCond.from_packed(inp["kv_compact"], inp["lens"].tolist())
    inf = cfg["inference"]
    params = [SamplingParams(cfg=inf["cfg_list"][0], tau=inf["tau_list"][0], top_k=inf["top_k"],
                             top_p=inf["top_p"], seed=inf["g_seed"])] * text.batch_size
    checks: list[Check] = []
    rows: list[str] = []

    # text path
    with torch.inference_mode(), model.autocast():
        rows_text, _ = build_text_rows(model, text.to(device), params, None)
        state = tf.prepare_text(rows_text)
        t = tf.text_norm(rows_text.features_BTC)
        ca_src, _ = TextCond(tf.text_proj_for_ca(t).float(), rows_text.lens_B).to_packed()
    checks.append(compare("cond_BD (pooled text)", state.sos_ND, ref["ar_cond_BD"], 1e-4))
    checks.append(compare("ca_kv (text_proj_for_ca)", ca_src, ref["ar_ca_kv"], 1e-4))
    checks.append(compare("cond_gss (shared AdaLN)", state.gss_N16C, ref["ar_cond_gss"], 1e-4))

    # teacher-forced AR (primary logits check) and free-running AR (bits)
    teacher = [ref[f"ar_bits_tok_s{i}"] for i in range(len(grids))]
    tf_out = generate(model, text, grids, params, teacher_bits=teacher, record=True)
    free = generate(model, text, grids, params, record=True)
    rows.append(f"{'scale':>5} {'grid':>7} {'bits equal':>14} {'max|dlogit| TF':>15} "
                f"{'TF argmax diff':>15} {'small-margin':>12}")
    diverged = False
    for si, grid in enumerate(grids):
        ref_logits = ref[f"ar_logits_s{si}"]
        margin = (ref_logits[..., 1] - ref_logits[..., 0]).abs()
        dlogit = (tf_out.guided_logits_per_scale[si] - ref_logits).abs().max().item()
        tf_arg = tf_out.guided_logits_per_scale[si].argmax(-1)
        tf_bad = int(((tf_arg != ref_logits.argmax(-1)) & (margin >= MARGIN)).sum())
        equal = free.bits_per_scale[si] == ref[f"ar_bits_tok_s{si}"]
        n_diff = int((~equal).sum())
        # free-running mismatches are acceptable only at near-ties; later scales are then incomparable
        if not diverged:
            bad = int(((~equal) & (margin >= MARGIN)).sum())
            checks.append(Check(f"free-run bits s{si}", bad == 0, f"{n_diff} differ ({bad} at margin >= {MARGIN})"))
            diverged = n_diff > 0
        checks.append(Check(f"teacher-forced logits s{si}", dlogit <= LOGIT_ATOL and tf_bad == 0,
                            f"max|d|={dlogit:.3g}, {tf_bad} argmax flips"))
        rows.append(f"{si:>5} {grid[0]:>3}x{grid[1]:<3} {f'{equal.numel() - n_diff}/{equal.numel()}':>14} "
                    f"{dlogit:>15.3g} {tf_bad:>15} {int((margin < MARGIN).sum()):>12}")
    for si in range(3):
        checks.append(compare(f"hidden s{si}", tf_out.hidden_per_scale[si], ref[f"ar_hidden_s{si}"], 1e-2, gate=False))
    if not diverged:
        checks.append(compare("summed codes", free.summed_codes_BDhw, ref["ar_summed_codes"], 1e-5))
        checks.append(compare("image float", free.images_float_B3HW, ref["ar_image_float"], 2e-4))
        ours_bgr = free.images_BHW3.flip(-1).int()
        d = (ours_bgr - ref["ar_image_uint8_bgr"].int()).abs()
        frac = (d > 0).float().mean().item()
        checks.append(Check("image uint8", int(d.max()) <= 1 and frac <= 1e-3,
                            f"max|d|={int(d.max())}, {100 * frac:.3f}% differ"))

    # training-path forward (teacher forcing of all scales at once)
    with torch.inference_mode(), model.autocast():
        rope = rope_tables(tf.cfg.head_dim, rope_positions(grids).to(device))
        tf_logits = tf.forward_train(text.to(device), inp["tf_x_BLC_wo_prefix"].float().to(device), grids, rope)
    checks.append(compare("tf_logits (training forward)", tf_logits, ref["tf_logits"], 2e-3))

    checks += vae_checks(model, cfg, inp, ref, device)
    return checks, rows


def vae_checks(model: InfinityModel, cfg: dict, inp: dict, ref: dict, device: str) -> list[Check]:
    vae = model.vae
    sched = [(h, w) for _, h, w in cfg["vae_only"]["schedule"]]
    out = []
    with torch.inference_mode():
        summed = 0
        for i in range(len(sched)):
            codes = bits_to_codes(inp[f"vae_only_bits_s{i}"][:, 0].to(device))
            summed = summed + resize_codes(codes, sched[-1])
        out.append(compare("VAE codes from bits", summed, ref["vae_only_summed_codes"], 1e-6))
        img = vae.decode(ref["vae_only_summed_codes"].to(device))
        out.append(compare("VAE decode", img, ref["vae_only_image_float"], 1e-4))
        h = vae.encode(ref["vae_only_image_float"].to(device))
        out.append(compare("VAE encoder", h, ref["vae_enc_h"], 1e-4))
        z, bits = vae.quantize_multiscale(ref["vae_enc_h"].to(device), sched)
        out.append(compare("VAE multi-scale quantizer", z, ref["vae_enc_z"], 1e-4))
        bad = 0
        for i in range(len(sched)):
            r = ref[f"vae_enc_bits_s{i}"][:, 0]
            bad += int((bits[i].cpu() != r).sum())
        out.append(Check("VAE quantizer bits", bad == 0, f"{bad} differ"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                    help="float32 reproduces the reference run; bfloat16 runs the official GPU precision")
    args = ap.parse_args(argv)
    if not (args.dir / "config.json").is_file():
        print(f"error: {args.dir} has no config.json", file=sys.stderr)
        return 2
    checks, rows = run_checks(args.dir, args.device, args.precision)
    print(f"reference: {args.dir}  device: {args.device}  precision: {args.precision}")
    print("\n".join(rows))
    print()
    for c in checks:
        print(f"[{'ok' if c.ok else 'FAIL':>4}] {c.name}: {c.detail}")
    n_fail = sum(not c.ok for c in checks)
    print(f"\n{len(checks) - n_fail} passed, {n_fail} failed")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
