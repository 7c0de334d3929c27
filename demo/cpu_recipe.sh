#!/usr/bin/env bash
# The demo model from nothing on this 2-core CPU, in one command and a 90-minute wall-clock budget
# (issue 6's CPU recipe; demo/README.md, "CPU part"):
#
#   bash demo/cpu_recipe.sh [OUT]          # OUT defaults to weights/cpu90
#
# 1. the tiny T5 pretrained on train captions (TEXT_MIN minutes, default 12), the reader thrown away;
# 2. the VAE: 500 steps at 1 thread, then 1,500 from there (the recipe of 2026-11-26, ~17 minutes);
# 3. the transformer from its seeded start, conditioned on that T5, in the time left of TOTAL_MIN
#    (default 90) less a minute for the export: per-scale loss, the last scale counted 3 times,
#    bitwise self-correction (flip rate up to 0.15), bf16 autocast, batch 8, TF_LR (default 6e-4);
# 4. the export to OUT/export (bf16 transformer, fp32 VAE, the T5), loadable as the demo preset's folder.
#
# Then: python -m demo.evaluate vae OUT/model && python -m demo.evaluate model OUT/export --n 384
# Budgets are wall-clock (`--minutes` fits each stage's step count after a 20-step probe), so the
# total holds on a slower machine with fewer steps; the step counts reached are in each stage's JSON log.
set -euo pipefail
OUT=${1:-weights/cpu90}
PY=${PY:-python}
TOTAL_MIN=${TOTAL_MIN:-90}
TEXT_MIN=${TEXT_MIN:-12}
TF_LR=${TF_LR:-6e-4}
t0=$(date +%s)
elapsed_min() { echo "scale=2; ($(date +%s) - $t0) / 60" | bc; }
say() { echo "[cpu_recipe $(date -u +%H:%M:%S), $(elapsed_min) min] $*"; }
mkdir -p "$OUT/model"

say "text encoder, $TEXT_MIN min"
$PY -m demo.train text --out "$OUT/text" --steps 100000 --minutes "$TEXT_MIN" --batch-size 128 --lr 1e-3 --threads 2
cp -r "$OUT/text/text_encoder" "$OUT/model/"

say "VAE, 500 + 1500 steps"
$PY -m demo.train vae --out "$OUT/vae1" --steps 500 --batch-size 4 --lr 1e-3 --shape-weight 4 --threads 1
$PY -m demo.train vae --out "$OUT/model" --init "$OUT/vae1/vae.safetensors" --data-seed 1 \
    --steps 1500 --batch-size 4 --lr 1e-3 --shape-weight 4 --threads 2

tf_min=$(echo "scale=2; $TOTAL_MIN - $(elapsed_min) - 1" | bc)
say "transformer, $tf_min min"
$PY -m demo.train transformer --out "$OUT/model" --per-scale-loss --flip-max 0.15 --last-scale-weight 3 \
    --amp bf16 --batch-size 8 --lr "$TF_LR" --data-seed 2 --steps 100000 --minutes "$tf_min" --threads 2

$PY -m demo.model export "$OUT/model" "$OUT/export"
say "done"
