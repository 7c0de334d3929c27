#!/usr/bin/env bash
# The demo model from nothing on this 2-core CPU, in one command and a 90-minute wall-clock budget
# (issue 6's CPU recipe; demo/README.md, "CPU part"):
#
#   bash demo/cpu_recipe.sh [OUT]          # OUT defaults to weights/cpu90
#
# 1. the tiny T5 pretrained on train captions (TEXT_MIN minutes, default 12), its reader thrown away;
# 2. the VAE: VAE1_STEPS (500) steps at 1 thread, then VAE2_STEPS (1500) from there (~17 minutes);
# 3. the transformer from its seeded start, conditioned on that T5, for the time left of TOTAL_MIN
#    (default 90) less a minute for the export (or TF_MIN minutes): per-scale loss, the last scale
#    counted 3 times, bitwise self-correction (flip rate up to 0.15), bf16 autocast, batch TF_BATCH
#    (8), peak LR TF_LR (6e-4);
# 4. the export to OUT/export (bf16 transformer, fp32 VAE, the T5): a folder the demo preset loads.
#
# Then: python -m demo.evaluate vae OUT/model && python -m demo.evaluate model OUT/export --n 384
# Budgets are wall-clock (`--minutes` fits a stage's step count after a 20-step probe), so the total
# holds on a slower machine, with fewer steps; each stage's JSON log has the steps it ran. The
# transformer stage saves a checkpoint every 200 steps (and on Ctrl-C): its command below with
# --resume added (--minutes then bounds the rest) goes on with its schedule after an interruption.
# Keep the machine otherwise idle: a busy CPU costs steps, not minutes.
set -euo pipefail
OUT=${1:-weights/cpu90}
PY=${PY:-python}
TOTAL_MIN=${TOTAL_MIN:-90}
TEXT_MIN=${TEXT_MIN:-12}
TF_LR=${TF_LR:-6e-4}
TF_BATCH=${TF_BATCH:-8}
t0=$(date +%s)
elapsed_min() { awk -v t0="$t0" -v now="$(date +%s)" 'BEGIN { printf "%.2f", (now - t0) / 60 }'; }
say() { echo "[cpu_recipe $(date -u +%H:%M:%S), $(elapsed_min) min] $*"; }
mkdir -p "$OUT/model"

say "text encoder, $TEXT_MIN min"
$PY -m demo.train text --out "$OUT/text" --steps 100000 --minutes "$TEXT_MIN" --batch-size 128 --lr 1e-3 --threads 2
cp -r "$OUT/text/text_encoder" "$OUT/model/"

say "VAE, ${VAE1_STEPS:-500} + ${VAE2_STEPS:-1500} steps"
$PY -m demo.train vae --out "$OUT/vae1" --steps "${VAE1_STEPS:-500}" --batch-size 4 --lr 1e-3 --shape-weight 4 \
    --threads 1
$PY -m demo.train vae --out "$OUT/model" --init "$OUT/vae1/vae.safetensors" --data-seed 1 \
    --steps "${VAE2_STEPS:-1500}" --batch-size 4 --lr 1e-3 --shape-weight 4 --threads 2

tf_min=${TF_MIN:-$(awk -v total="$TOTAL_MIN" -v used="$(elapsed_min)" 'BEGIN { printf "%.2f", total - used - 1 }')}
say "transformer, $tf_min min"
$PY -m demo.train transformer --out "$OUT/model" --per-scale-loss --flip-max 0.15 --last-scale-weight 3 \
    --amp bf16 --batch-size "$TF_BATCH" --lr "$TF_LR" --data-seed 2 --steps 100000 --minutes "$tf_min" \
    --save-every 200 --threads 2

$PY -m demo.model export "$OUT/model" "$OUT/export"
say "done"
