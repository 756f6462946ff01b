#!/usr/bin/env bash
# Old code against new on one GPU, in one device call: scripts/bench_gpu.py on each, alternating.
#
# A change to the engine is measured as new ÷ old of the same configuration in the same call (the
# speed-up ÷ ideal of one run moves by about ±0.02 with its unpruned denominator). On this machine first:
#   rm -rf .baseline && mkdir .baseline && git archive OLD fitprune scripts | tar -x -C .baseline
# (.baseline is git-ignored; pass it in the device tool's carry). Then, on the device:
#   GEOMETRIES=llava-next-7b,qwen2-vl-7b BATCHES=8 OUT=$OUT bash scripts/gpu_ab.sh
# Each geometry runs new then old or old then new (ORDER=new-first, old-first, or alternate, the default: new first
# for the 1st, 3rd, ... geometry). Every run writes $OUT/ab/<geometry>-<old|new>.{log,json}, and after
# each one the whole folder is bundled into $OUT/ab.tgz, so a call cut off by its limit keeps what it
# measured and the device's limit on returned files is never met. Back here:
#   tar xzf <files_at>/ab.tgz -C /tmp && python scripts/compare_bench.py /tmp/ab/G-old.json /tmp/ab/G-new.json ...
# BENCH_ARGS replaces the bench_gpu arguments after --geometries/--batches (default: the LM prefill,
# eager and graphed, fused scores on); RUN_LIMIT_S bounds each run (default 150 s); PYTHON names the
# interpreter (default python).
set -uo pipefail
OUT=${OUT:?set OUT to the folder the device tool returns}
ROOT=$(pwd)
[ -f .baseline/scripts/bench_gpu.py ] || { echo "gpu_ab: no .baseline/scripts/bench_gpu.py; see this script's header" >&2; exit 2; }
GEOMETRIES=${GEOMETRIES:-llava-next-7b,qwen2-vl-7b,llava-1.5-7b}
BATCHES=${BATCHES:-8}
ORDER=${ORDER:-alternate}
BENCH_ARGS=${BENCH_ARGS:---parts prefill --fused-scores on --cuda-graphs both}
mkdir -p "$OUT/ab"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
unset PYTHONPATH  # each side's bench_gpu.py puts its own tree first on the path
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/ab/gpu.txt" 2>/dev/null || true

run() {  # side geometry
  local dir=$ROOT
  [ "$1" = old ] && dir=$ROOT/.baseline
  (cd "$dir" && timeout "${RUN_LIMIT_S:-150}" "${PYTHON:-python}" scripts/bench_gpu.py --geometries "$2" --batches "$BATCHES" \
    $BENCH_ARGS --out "$OUT/ab/$2-$1.json" > "$OUT/ab/$2-$1.log" 2>&1)
  echo "$1 $2 exit $?" | tee -a "$OUT/ab/gpu.txt"
  tar czf "$OUT/ab.tgz" -C "$OUT" ab
}

i=0
for g in ${GEOMETRIES//,/ }; do
  if [ "$ORDER" = new-first ] || { [ "$ORDER" = alternate ] && [ $((i % 2)) -eq 0 ]; }; then
    run new "$g"; run old "$g"
  else
    run old "$g"; run new "$g"
  fi
  i=$((i + 1))
done
rm -rf "$OUT/ab"  # everything is in ab.tgz
