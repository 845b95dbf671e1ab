#!/usr/bin/env bash
# Every benchmark on one GPU at realistic sizes, in one command (issue 8):
#   V = 151,936 (the Qwen2.5 vocabulary), T = 4,096 tokens per sequence, a ~0.5B student (24 layers × 1024)
#   and a ~1.3B teacher (28 × 1536); random weights built on the spot (nothing is downloaded).
#
#   bash jobs/bench_gpu.sh [OUT_DIR]          # default OUT_DIR: runs/bench_gpu
#   DRY_RUN=1 bash jobs/bench_gpu.sh          # print the commands only
#
# Each benchmark prints its table (absolute tokens/s, MFU against the GPU's bf16 peak, peak memory) and writes
# OUT_DIR/<name>.json. A benchmark that fails or times out is reported and the next one still runs; the script
# exits 1 if any failed. Environment (all optional):
#   BENCHMARKS="loss summary teacher student pipeline checkpoint"   the subset to run, in this order
#   REPEATS=2        interleaved repeats of the teacher, pipeline and checkpoint benchmarks (loss: 7)
#   STEPS=40         optimizer steps per pipeline run (the first 8 are warm-up, left out of steady state)
#   BENCH_TIMEOUT=0  seconds allowed to each benchmark (0: no limit), for leased machines
#   PEAK_TFLOPS=…    the bf16 peak for MFU, for a GPU missing from jobs/bench/measure.py's table
# About 10-15 minutes on one H200 with the defaults; the pipeline benchmark needs the GPU to itself (teacher and
# student share it).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/bench_gpu}
PYTHON=${PYTHON:-python3}
BENCHMARKS=${BENCHMARKS:-loss summary teacher student pipeline checkpoint}
REPEATS=${REPEATS:-2}
STEPS=${STEPS:-40}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-0}
VOCAB=151936
SEQ=4096
PEAK=${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS}

failed=()
run() {  # run NAME ARGS...: one benchmark, its JSON in $OUT/NAME.json
  local name=$1
  shift
  echo "+ $PYTHON jobs/bench.py $name $* --json $OUT/$name.json"
  [ -n "${DRY_RUN:-}" ] && return
  local started=$SECONDS
  timeout "$BENCH_TIMEOUT" "$PYTHON" jobs/bench.py "$name" "$@" --json "$OUT/$name.json"
  local rc=$?
  echo "[bench_gpu] $name: exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${BENCH_TIMEOUT} s"))")
}

if [ -z "${DRY_RUN:-}" ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch: this script measures on a GPU (use jobs/bench.py on CPU)')" || exit 1
  mkdir -p "$OUT"
fi

for name in $BENCHMARKS; do
  case $name in
    # Loss step: TAD vs KD on full logits, TAD vs top-K from a summary; two sequences of 4,096 tokens, d = 1024.
    loss) run loss --device cuda --tokens $((2 * SEQ)) --batch 2 --vocab $VOCAB --dim 1024 --chunk-tokens 1024 \
            --memory-tokens $SEQ,$((2 * SEQ)),$((4 * SEQ)) --repeats 7 --warmup 2 ;;
    # Summary fidelity at the real vocabulary (a CPU computation: the numbers do not depend on the device), and
    # the lean teacher's memory on the GPU in bf16 (summary from hidden states vs from full logits).
    summary) run summary --device cuda --teacher synthetic --synthetic-vocab $VOCAB --synthetic-batch 1 \
               --synthetic-seq 1024 --seeds 3 ;;
    # Teacher scoring: the actor pool (one GPU actor) vs the same scorer in process.
    teacher) run teacher --device cuda --vocab $VOCAB --seq-len $SEQ --layers 28 --width 1536 --blocks 64 \
               --batch-size 4 --repeats "$REPEATS" $PEAK ;;
    # The student's step (24 × 1024, bf16, one sequence of 4,096 tokens): activation checkpointing and compiled
    # blocks (train.activation_checkpointing, train.compile) against plain, peak memory and seconds.
    student) run student --device cuda --vocab $VOCAB --seq-len $SEQ --layers 24 --width 1024 --batch 1 --compile \
               --repeats 5 --warmup 2 $PEAK ;;
    # Student training: teacher pool streaming vs Parquet cache vs a single-process loop.
    pipeline) run pipeline --device cuda --vocab $VOCAB --seq-len $SEQ --teacher-layers 28 --teacher-width 1536 \
                --student-layers 24 --student-width 1024 --batch 2 --teacher-batch 2 --steps "$STEPS" \
                --warmup-steps 8 --repeats "$REPEATS" $PEAK ;;
    # One checkpoint of the student (weights + AdamW state, from GPU memory): in place vs written locally and copied.
    checkpoint) run checkpoint --device cuda --vocab $VOCAB --layers 24 --width 1024 --repeats "$REPEATS" ;;
    *) echo "BENCHMARKS: unknown benchmark '$name'; choose from: loss summary teacher student pipeline checkpoint" >&2
       exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[bench_gpu] failed: ${failed[*]}" >&2
  exit 1
fi
echo "results: $OUT/{$(echo $BENCHMARKS | tr ' ' ',')}.json"
