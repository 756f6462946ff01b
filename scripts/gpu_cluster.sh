#!/usr/bin/env bash
# Issue 13: one sweep serially and on a Dask cluster of this host's GPUs (run through the device tool).
#
# One sweep run twice on fresh data roots: serially (`fitprune sweep --device cuda`) and on a Dask
# cluster of $WORKERS worker processes (`--cluster tcp://127.0.0.1:$PORT`), worker i on GPU
# (i - 1) mod $GPUS. Defaults: GPUS = the GPUs nvidia-smi lists; WORKERS = GPUS, or 2 on one GPU (two
# workers sharing it: the code path, no scaling). Prints the wall times, samples GPU utilisation and
# memory every 500 ms during each run, and checks with `python -m storage.compare` that the two roots
# hold the same sweep. Writes under $OUT:
# times.txt (wall times, compare's verdict, GPU utilisation and peak memory per GPU), compare.txt,
# serial.out, cluster.out (the printed tables) and logs.tgz (serial.err, cluster.err, scheduler.log,
# worker-N.log, smi-{serial,cluster}.csv): five files, because the device tool returns at most eight.
#
# A 7B geometry, where scale-out pays: `python scripts/random_checkpoint.py /tmp/r7b --samples 256` first,
# then SWEEP_ARGS="--model /tmp/r7b/model --source hf:/tmp/r7b/inputs --benchmarks hf:/tmp/r7b/inputs ...".
#
# The device has torch, transformers and pyarrow, not prefect, dask or duckdb. Stage their wheels
# first (a tar of `pip download` output for the device's Python, split in parts under 64 MiB that
# earlier calls copy to $STAGE as cluster-part00, cluster-part01, ...), then:
#   WHEELS_SHA256=<sha of the joined parts> SWEEP_ARGS="--source toy --model toy ..." bash scripts/gpu_cluster.sh
# The parts of the 2026-12-06 run (121 wheels, 69 MB; two parts of 35 MB, each carried by its own call,
# the second within 30 s of the first so that the warm machine kept /tmp/stage):
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 --platform any -d WHEELS "prefect-dask==0.3.7" "distributed>=2026.7,<2027" \
#     "duckdb>=2.0.1,<3" "prefect>=3.9,<4"
#   tar cf cluster.tar -C WHEELS . && split -b 35m -d cluster.tar cluster-part && sha256sum cluster.tar
# (the 7B run's hf: inputs need `datasets` too: add "datasets>=3" to that download; not yet run there)
# On a CPU machine with the cluster extras installed, DEVICE=cpu SKIP_INSTALL=1 runs the same steps.
# A sweep too long for both runs in one call: ROOTS=/tmp/roots RUNS=serial in one call, then within
# 30 s (the warm machine keeps /tmp) ROOTS=/tmp/roots RUNS=cluster, which also compares the two.
set -euo pipefail
OUT=${OUT:-runs/gpu-cluster}
STAGE=${WHEELS_DIR:-/tmp/stage}
DEVICE=${DEVICE:-cuda}
PORT=${PORT:-8786}
if [ -z "${GPUS:-}" ]; then
  GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$GPUS" -ge 1 ] || GPUS=1
fi
if [ "$GPUS" -gt 1 ]; then WORKERS=${WORKERS:-$GPUS}; else WORKERS=${WORKERS:-2}; fi
PY=${PYTHON:-python3}
SWEEP_ARGS=${SWEEP_ARGS:---source toy --model toy --budgets 0.3,0.5,0.7,0.85}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${SKIP_INSTALL:-}" ] && [ ! -d /tmp/site/distributed ]; then
  mkdir -p /tmp/cwhl
  cat "$STAGE"/cluster-part* > /tmp/cluster.tar
  echo "${WHEELS_SHA256:?set WHEELS_SHA256 to the sha256 of the joined parts}  /tmp/cluster.tar" | sha256sum -c -
  tar xf /tmp/cluster.tar -C /tmp/cwhl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/cwhl/*.whl
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PREFECT_HOME=${PREFECT_HOME:-/tmp/prefect-home}
ROOTS=${ROOTS:-$(mktemp -d)}  # serial/ and cluster/; name one in /tmp to split the runs over calls
RUNS=${RUNS:-serial cluster}  # one of them per call where both exceed a call's limit (same ROOTS, 30 s apart)
mkdir -p "$ROOTS"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

smi() {  # sample utilisation and memory of every GPU until killed
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$1" &
  else
    sleep infinity > /dev/null &
  fi
  echo $!
}

run() {  # run NAME ROOT [extra sweep args]: the sweep, timed, with GPU sampling
  local name=$1 root=$2; shift 2
  local s t0 t1 rc=0
  s=$(smi "$OUT/smi-$name.csv")
  t0=$(date +%s%N)
  # shellcheck disable=SC2086
  timeout "${LIMIT_S:-240}" $PY -m flows.cli sweep --data-root "$root" --device "$DEVICE" $SWEEP_ARGS "$@" \
    > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  t1=$(date +%s%N)
  kill "$s" 2>/dev/null || true
  echo "$name rc $rc seconds $(( (t1 - t0) / 1000000 ))e-3" | tee -a "$OUT/times.txt"
}

if [[ " $RUNS " == *" serial "* ]]; then run serial "$ROOTS/serial"; fi
if [[ " $RUNS " == *" cluster "* ]]; then
$PY -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$PORT" --no-dashboard > "$OUT/scheduler.log" 2>&1 &
pids+=($!)
for i in $(seq 1 "$WORKERS"); do
  CUDA_VISIBLE_DEVICES=$(( (i - 1) % GPUS )) DASK_CONFIG=flows/dask \
    $PY -m distributed.cli.dask_worker "tcp://127.0.0.1:$PORT" --nworkers 1 --nthreads 1 --resources gpu=1 \
    --no-dashboard > "$OUT/worker-$i.log" 2>&1 &
  pids+=($!)
done
$PY - "$PORT" "$WORKERS" <<'PY'
import sys
from distributed import Client
client = Client(f"tcp://127.0.0.1:{sys.argv[1]}", timeout=120)
client.wait_for_workers(int(sys.argv[2]), timeout=180)
print("workers up:", len(client.scheduler_info(n_workers=-1)["workers"]))
client.close()
PY
run cluster "$ROOTS/cluster" --cluster "tcp://127.0.0.1:$PORT"
fi

if [ -d "$ROOTS/serial/tables" ] && [ -d "$ROOTS/cluster/tables" ]; then  # both stored something
  rc=0
  $PY -m storage.compare "$ROOTS/serial" "$ROOTS/cluster" > "$OUT/compare.txt" 2>&1 || rc=$?
  echo "storage.compare rc $rc" | tee -a "$OUT/times.txt"
  head -20 "$OUT/compare.txt"
fi
for name in serial cluster; do
  if [ -s "$OUT/smi-$name.csv" ]; then  # mean utilisation and peak memory per GPU while the sweep ran
    awk -F', ' -v n="$name" '{u[$2]+=$3; c[$2]++; m=$4+0; if (m>p[$2]) p[$2]=m}
      END {for (g in u) printf "%s gpu %s mean util %.1f %% over %d samples, peak memory %d MiB\n",
                               n, g, u[g]/c[g], c[g], p[g]}' \
      "$OUT/smi-$name.csv" | tee -a "$OUT/times.txt"
  fi
done
tail -n 15 "$OUT/cluster.out" 2>/dev/null || true
(  # the logs in one file: the device tool returns at most eight
  cd "$OUT"
  logs=()  # what exists of them (no smi-*.csv without nvidia-smi)
  for f in serial.err cluster.err scheduler.log worker-*.log smi-*.csv; do [ -e "$f" ] && logs+=("$f"); done
  if [ "${#logs[@]}" -gt 0 ] && tar czf logs.tgz "${logs[@]}"; then rm -f "${logs[@]}"; fi
)
