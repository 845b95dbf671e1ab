#!/usr/bin/env bash
# Every benchmark on one GPU at realistic sizes, in one command (issue 8):
#   V = 151,936 (the Qwen2.5 vocabulary), T = 4,096 tokens per sequence, a ~0.5B student (24 layers × 1024)
#   and a ~1.3B teacher (28 × 1536); random weights built on the spot (nothing is downloaded).
#
#   bash jobs/bench_gpu.sh [OUT_DIR]          # default OUT_DIR: runs/bench_gpu
#   DRY_RUN=1 bash jobs/bench_gpu.sh          # print the commands only
#
# Each benchmark prints its table (absolute tokens/s, MFU against the GPU's bf16 peak, peak memory) and writes
# OUT_DIR/<name>.json. Set PEAK_TFLOPS for a GPU missing from tailkd_ray/benchmarks/measure.py's table.
# About 15-25 minutes on one H200; the pipeline benchmark needs the GPU to itself (teacher and student share it).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/bench_gpu}
PYTHON=${PYTHON:-python3}
VOCAB=151936
SEQ=4096
PEAK=${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS}

run() {
  echo "+ $*"
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

if [ -z "${DRY_RUN:-}" ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch: this script measures on a GPU (use jobs/bench.py on CPU)')"
  mkdir -p "$OUT"
fi

# Loss step: TAD vs KD on full logits, TAD vs top-K from a summary; two sequences of 4,096 tokens, d = 1024.
run "$PYTHON" jobs/bench.py loss --device cuda --tokens $((2 * SEQ)) --batch 2 --vocab $VOCAB --dim 1024 \
  --chunk-tokens 1024 --memory-tokens $SEQ,$((2 * SEQ)),$((4 * SEQ)) --repeats 7 --warmup 2 --json "$OUT/loss.json"
# Summary fidelity at the real vocabulary (a CPU computation: the numbers do not depend on the device).
run "$PYTHON" jobs/bench.py summary --teacher synthetic --synthetic-vocab $VOCAB --synthetic-batch 1 \
  --synthetic-seq 1024 --seeds 3 --json "$OUT/summary.json"
# Teacher scoring: the actor pool (one GPU actor) vs the same scorer in process.
run "$PYTHON" jobs/bench.py teacher --device cuda --vocab $VOCAB --seq-len $SEQ --layers 28 --width 1536 \
  --blocks 64 --batch-size 4 --repeats 2 $PEAK --json "$OUT/teacher.json"
# Student training: teacher pool streaming vs Parquet cache vs a single-process loop.
run "$PYTHON" jobs/bench.py pipeline --device cuda --vocab $VOCAB --seq-len $SEQ --teacher-layers 28 \
  --teacher-width 1536 --student-layers 24 --student-width 1024 --batch 2 --teacher-batch 2 --steps 40 \
  --warmup-steps 8 --repeats 2 $PEAK --json "$OUT/pipeline.json"
echo "results: $OUT/{loss,summary,teacher,pipeline}.json"
