"""Loading the demo model: shipped weights (bf16 safetensors in demo/weights) and its tiny T5."""

from __future__ import annotations

import shutil
from pathlib import Path

from .preset import DEMO_PRESET, demo_file_paths, register_demo_preset

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def demo_text_encoder_dir(weights_dir: Path) -> Path:
    """The weights folder's text_encoder/. There is no fallback: a transformer only follows captions
    through the T5 it was trained with (since stage 10 a pretrained one, not the seeded build)."""
    shipped = demo_file_paths(weights_dir)["text_encoder"]
    if not (shipped / "config.json").is_file():
        raise FileNotFoundError(
            f"{shipped}/config.json is missing: the demo transformer needs the tiny T5 it was trained with; "
            f"copy the text_encoder/ folder of its training run into {weights_dir}")
    return shipped


def load_demo_engine(weights_dir: str | Path | None = None, device: str = "cpu"):
    """An Engine on the demo model (float32: this CPU has no fast bf16 matmul)."""
    from pruning.engine import Engine

    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    register_demo_preset(root)
    files = demo_file_paths(root)
    # T5 on the longest prompt (the tiny T5's default), as in training: not on 512 padded positions
    return Engine.from_preset(DEMO_PRESET, transformer_path=files["transformer"], vae_path=files["vae"],
                              text_encoder_path=demo_text_encoder_dir(root), device=device, dtype_policy="float32")


def export_weights(src_dir: str | Path, dst_dir: str | Path = WEIGHTS_DIR) -> dict[str, int]:
    """Copy trained weights into the shipped folder: the transformer's floating tensors as bf16
    (7.2 M parameters: 14 MB instead of 29), the small VAE as trained (float32); the loader
    upcasts to the dtype policy. Returns bytes written per file."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in ("vae.safetensors", "transformer.safetensors"):
        sd = load_file(str(Path(src_dir) / name))
        if name.startswith("transformer"):
            sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}
        sd = {k: v.contiguous() for k, v in sd.items()}
        save_file(sd, str(dst / name), metadata={"format": "pt", "source": "demo.train"})
        sizes[name] = (dst / name).stat().st_size
    src_t5 = Path(src_dir) / "text_encoder"  # the frozen tiny T5 the transformer was trained with
    if (src_t5 / "config.json").is_file():
        (dst / "text_encoder").mkdir(exist_ok=True)
        for f in src_t5.iterdir():
            shutil.copyfile(f, dst / "text_encoder" / f.name)
            sizes[f"text_encoder/{f.name}"] = f.stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> None:
    """``python -m demo.model export <trained dir> [<dst>]``: write the shipped weights folder."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m demo.model")
    p.add_argument("command", choices=("export",))
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, nargs="?", default=WEIGHTS_DIR)
    a = p.parse_args(argv)
    sizes = export_weights(a.src, a.dst)
    print(json.dumps({"dst": str(a.dst), "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 2)}))


if __name__ == "__main__":
    main()
