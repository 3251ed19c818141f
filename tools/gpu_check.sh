#!/bin/bash
# GPU checks of retina_sweep, as one script with a time limit per phase (docs/benchmarks.md,
# "On a GPU"). Run from the repository root on a machine with one CUDA GPU:
#   bash tools/gpu_check.sh                 # results under $OUT (default /tmp/gpu_check)
# WHEELS=dir installs the wheels in dir to /tmp/site first (a machine without package access).
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export RETINA_SWEEP_CACHE=${RETINA_SWEEP_CACHE:-/tmp/gpu_check_cache}
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
S=$SECONDS
phase() {  # name limit command...: the log goes to $OUT/name.log, its key lines to stdout
  local name=$1 lim=$2; shift 2; local t0=$SECONDS
  echo "=== $name (limit $lim s) at $((t0 - S)) s"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0)) s"
  grep -E "AP=|Error|Traceback|passed|failed|pretrained|iterations in|peak GPU|done AP|^\| " \
    "$OUT/$name.log" | cut -c1-300 | tail -n 25
}
# 1. the CUDA tests (device-independent crops, smoke runs with and without AMP).
phase pytest_cuda 180 $PY -m pytest -q -m cuda tests/test_cuda.py
# 2. the proxy trial as users run it (pretraining on the GPU on a cold cache), fp32 then AMP.
phase proxy_fp32 150 $PY -m retina_sweep tracking=none train.amp=false paths.root=/tmp/gc1 \
  train.progress=false
phase proxy_amp 90 $PY -m retina_sweep tracking=none paths.root=/tmp/gc2 train.progress=false
# 3. paper scale (ResNet-50-FPN, 600 px, batch 16, AMP) through the COCO loader, on the proxy's
#    images laid out as COCO; no ImageNet download.
SYN=$(dirname "$(ls -d "$RETINA_SWEEP_CACHE"/synthetic/*/train.json | head -1)")
C=/tmp/gc_coco; mkdir -p $C/annotations
ln -sfn "$SYN/train.json" $C/annotations/instances_train2017.json
ln -sfn "$SYN/val.json" $C/annotations/instances_val2017.json
ln -sfn "$SYN/train" $C/train2017; ln -sfn "$SYN/val" $C/val2017
phase paper 150 $PY -m retina_sweep scale=paper data=coco data.root=$C data.num_classes=8 \
  model.backbone.pretrained=null tracking=none train.iterations=300 train.warmup_iters=50 \
  train.checkpoint_every=100000 paths.root=/tmp/gc3 train.progress=false
# 4. the benchmark (ours against torchvision's RetinaNet in the same run).
phase bench 150 $PY -m retina_sweep.bench model strategies
# 5. a tracked sweep, 4 trials at once on the GPU, then its table.
phase sweep 200 $PY -m retina_sweep +sweep=anchors launcher=parallel hydra.launcher.n_jobs=4 \
  train.threads=2 paths.root=/tmp/gc_sweep train.progress=false \
  tracking.uri=sqlite:///$OUT/mlflow.db
phase report 120 $PY -m retina_sweep.report table=1c tracking_uri=sqlite:///$OUT/mlflow.db \
  out=$OUT/report
echo "=== total $((SECONDS - S)) s; logs and mlflow.db under $OUT"
