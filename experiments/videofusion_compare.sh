#!/usr/bin/env bash
# VideoFusion vs VDM on the synthetic shapes, side by side on one CPU
# (docs/videofusion.md has the results): the base image model, then VDM's
# quickstart UNet and VideoFusion (joint / frozen base, lambda 0.5, 0.25,
# 0.75), each STEPS steps, each sampled (N videos, SAMPLE_STEPS ancestral
# steps) and scored by experiments/quickstart_quality.py. The runs of a
# group train side by side (one process each; on a shared 2-core machine
# each gets its share of the cores), so compare their quality at equal
# steps, not their wall times (experiments/videofusion_cost.py times them).
#
#   STEPS=300 bash experiments/videofusion_compare.sh runs/vf_compare
#   GROUPS_TO_RUN="main lambda" STEPS=120 N=16 SAMPLE_STEPS=32 bash ...
set -euo pipefail
OUT=${1:-runs/vf_compare}
STEPS=${STEPS:-300}
BASE_STEPS=${BASE_STEPS:-600}
N=${N:-32}
SAMPLE_STEPS=${SAMPLE_STEPS:-64}
GROUPS_TO_RUN=${GROUPS_TO_RUN:-main lambda}
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
mkdir -p "$OUT"
VF=configs/videofusion_quickstart.py
COMMON="--config.training.log_every_steps=25 --config.training.checkpoint_every_steps=$STEPS"
SAMPLE="--mode=sample --config.sample.num_videos=$N --config.sample.batch_size=$N --config.sample.num_steps=$SAMPLE_STEPS"

run() {  # name config flags...
  local name=$1 cfg=$2; shift 2
  local start=$(date +%s)
  $PY -m vdm_jax.main --config="$cfg" --workdir="$OUT/$name" $COMMON "$@" \
    > "$OUT/$name.train.log" 2>&1
  local mid=$(date +%s)
  $PY -m vdm_jax.main --config="$cfg" --workdir="$OUT/$name" $SAMPLE "$@" \
    > "$OUT/$name.sample.log" 2>&1
  local end=$(date +%s)
  echo "$name train_wall_s=$((mid - start)) sample_wall_s=$((end - mid))" \
    | tee -a "$OUT/times.txt"
}

if [ ! -d "$OUT/base/checkpoints/$BASE_STEPS" ]; then
  $PY -m vdm_jax.main --config=$VF:base --workdir="$OUT/base" $COMMON \
    --config.training.num_train_steps="$BASE_STEPS" > "$OUT/base.train.log" 2>&1
  echo "base done" | tee -a "$OUT/times.txt"
fi
S="--config.training.num_train_steps=$STEPS"
B="--config.videofusion.base_workdir=$OUT/base"
for group in $GROUPS_TO_RUN; do
  if [ "$group" = main ]; then
    run vdm configs/quickstart.py $S &
    run vf_joint $VF $S $B &
    run vf_frozen $VF $S $B --config.videofusion.base_training=frozen &
  else
    run vf_l025 $VF $S $B --config.diffusion.noise_lambda=0.25 &
    run vf_l075 $VF $S $B --config.diffusion.noise_lambda=0.75 &
  fi
  wait
done
PYTHONPATH=. $PY experiments/quickstart_quality.py --config=configs/quickstart.py \
  "$OUT"/*/samples/step_*/unconditional/samples.npz | tee "$OUT/quality.jsonl"
