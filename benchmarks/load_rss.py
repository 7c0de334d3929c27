"""Peak memory and time of loading a full-size transformer checkpoint (not a test).

Writes an Infinity-2B-shaped checkpoint of random bf16 weights (a single .pth of about 4.4 GB and,
with --safetensors, the same as .safetensors), then loads each in a fresh subprocess with
``load_transformer`` (official dtype policy) and reports the peak RSS (VmHWM) right after the
load and after every weight has been read once, against the file size.

    python -m benchmarks.load_rss [--dir DIR] [--preset infinity-2b] [--safetensors] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_ST_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def random_state_dict(preset: str) -> dict[str, torch.Tensor]:
    """Random bf16 weights in the preset's transformer layout, generated tensor by tensor."""
    from model_loader import build_transformer, get_preset

    meta = build_transformer(get_preset(preset).transformer, device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, t in meta.items():
        if k.endswith("zero_k_bias"):
            out[k] = torch.zeros(t.shape, dtype=torch.bfloat16)
        else:
            out[k] = torch.randn(t.shape, generator=g, dtype=torch.bfloat16).mul_(0.02)
    return out


def write_safetensors_streaming(sd: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors writer that streams each tensor's bytes (no second in-memory copy of the file)."""
    header, offset = {}, 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in sd.values():
            f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))


def child(path: str, preset: str) -> None:
    """Runs in the fresh subprocess: load, measure, read every weight, measure again."""
    from model_loader.checkpoint import load_transformer

    base = vm_kib("VmRSS")
    t0 = time.perf_counter()
    model = load_transformer(preset, path)
    load_s = time.perf_counter() - t0
    after_load = vm_kib("VmHWM")
    t0 = time.perf_counter()
    total = 0.0
    for p in model.parameters():
        total += float(p.float().sum())
    touch_s = time.perf_counter() - t0
    print(json.dumps({"base_kib": base, "load_s": load_s, "peak_load_kib": after_load,
                      "touch_s": touch_s, "peak_touch_kib": vm_kib("VmHWM"), "checksum": total}))


def measure(path: Path, preset: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.load_rss", "--child", str(path), "--preset", preset]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="folder for the checkpoint files (default: a temp folder)")
    ap.add_argument("--preset", default="infinity-2b")
    ap.add_argument("--safetensors", action="store_true", help="also write and load a .safetensors copy")
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.preset)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="load_rss_"))
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "transformer.pth"] + ([folder / "transformer.safetensors"] if args.safetensors else [])
    try:
        t0 = time.perf_counter()
        sd = random_state_dict(args.preset)
        torch.save(sd, files[0])
        if args.safetensors:
            write_safetensors_streaming(sd, files[1])
        del sd
        names = ", ".join(f.name for f in files)
        print(f"wrote {names} in {time.perf_counter() - t0:.1f} s (loads below see a warm page cache)")
        print(f"{'file':<24}{'size GB':>9}{'load s':>8}{'base GB':>9}{'peak GB':>9}{'peak/size':>10}"
              f"{'read-all s':>11}{'peak GB':>9}{'peak/size':>10}")
        for f in files:
            r = measure(f, args.preset)
            size = f.stat().st_size
            gb = lambda kib: kib * 1024 / 1e9
            ratio = lambda kib, size=size: kib * 1024 / size
            print(f"{f.name:<24}{size / 1e9:>9.2f}{r['load_s']:>8.2f}{gb(r['base_kib']):>9.2f}"
                  f"{gb(r['peak_load_kib']):>9.2f}{ratio(r['peak_load_kib']):>10.2f}"
                  f"{r['touch_s']:>11.2f}{gb(r['peak_touch_kib']):>9.2f}{ratio(r['peak_touch_kib']):>10.2f}")
    finally:
        if not args.keep:
            for f in files:
                f.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
