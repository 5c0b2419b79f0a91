#!/usr/bin/env bash
# Issue #15's GPU check, prepared here and run in one call of the `device` tool (a lent GPU has
# ~15 minutes in all: one call of ~8 minutes, leaving time for a rerun).
#
# Here, once per session, from the repository root (needs pip's registry and ../shared):
#     bash scripts/gpu_check.sh prepare
#   writes .whl/ (wheels the GPU image lacks or has in other versions: trl, datasets, transformers,
#   huggingface_hub and their pure-Python needs) and .gpu/ (the HH pairs, a tokenizer trained on
#   them), both ignored through .git/info/exclude.
# Then one device call:
#     run(command="bash scripts/gpu_check.sh run", carry=[".whl", ".gpu"], timeout_s=570)
#   which (1) runs tests/test_cuda.py (FlexAttention with the block mask = per-segment SDPA = the CPU,
#   with gradients; bf16 log-probs within 1e-2 of fp32; a CUDA run follows the CPU run and `auto`
#   picks bf16), (2) builds a Qwen2-0.5B-shaped model with random weights on the GPU machine,
#   (3) runs `directpo bench --device cuda` against TRL on it (same optimizer, micro-batch and
#   accumulation on both sides; directpo fp32 and bf16, TRL live reference, precomputed fp32, with
#   gradient checkpointing, bf16), (4) the sampling bench (`--sample`: directpo's sampler against
#   transformers' `generate`, K = 1 and 16) and (5) the end-to-end bench (`--end-to-end`: the whole
#   `directpo train` command against TRL's script, by phase). Results come back in $OUT: gpu.txt,
#   tests.txt, bench.log + gpu-qwen2-0.5b.json, sample.log + sample-qwen2-0.5b.json/.md, e2e.log +
#   e2e-qwen2-0.5b.json/.md. Budgets inside the 570 s: tests 120 s (FlexAttention compiles), the
#   model ~30 s, the training bench 210 s (six runs of 5 timed steps), sampling 90 s, end-to-end
#   100 s; a bench cut short still leaves each finished run's line in its log. A second argument
#   picks the parts to run (a rerun of what did not finish): `run bench,sample,e2e` (default
#   `tests,bench,sample,e2e`; the model is built whenever a bench runs).
# `bash scripts/gpu_check.sh dry-run [PARTS]` does (2)-(5) here on the CPU with a 2-layer stand-in
# and small sizes, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}

wheels() {
  # Pure-Python wheels (py3-none-any; multiprocess has one per Python, the image's is 3.12).
  local pins="trl==1.16.0 datasets==5.2.0 transformers==5.24.0 huggingface_hub==2.4.0 dill==0.4.1 multiprocess==0.70.19"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
}

case "$MODE" in
prepare)
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  rm -rf .whl .gpu && mkdir -p .whl .gpu/shared/data/hh-rlhf
  wheels || exit 1
  cp ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz .gpu/shared/data/hh-rlhf/
  ${PY:-.venv/bin/python} scripts/gpu_model.py tokenizer .gpu/tokenizer .gpu/shared/data/hh-rlhf/harmless-base-test.jsonl.gz || exit 1
  du -sh .whl .gpu
  ;;
run|dry-run)
  PARTS=${2:-tests,bench,sample,e2e}
  OUT=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIRECTPO_SHARED="$PWD/.gpu/shared"
  if [ "$MODE" = run ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src"
    PY=python3 DEVICE=cuda MODEL_SIZE=qwen2-0.5b MAXLEN=512 STEPS=5 ROWS=64 PAIRS=200
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
  else
    PY=${PY:-.venv/bin/python} DEVICE=cpu MODEL_SIZE=stand-in MAXLEN=128 STEPS=2 ROWS=16 PAIRS=24
  fi
  $PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)" >> "$OUT/gpu.txt" 2>&1
  has() { [[ ",$PARTS," == *",$1,"* ]]; }
  if [ "$MODE" = run ] && has tests; then  # (1) the CUDA paths against the CPU ones
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/tests.txt" 2>&1
    echo "tests exit $?" >> "$OUT/tests.txt"
  fi
  if has bench || has sample || has e2e; then
    # (2) the model: built here, random weights (seeded), the tokenizer prepared beside the data
    $PY scripts/gpu_model.py model /tmp/gpu-model .gpu/tokenizer "$MODEL_SIZE" > "$OUT/model.log" 2>&1 || exit 1
  fi
  HH=.gpu/shared/data/hh-rlhf/harmless-base-test.jsonl.gz
  if has bench; then  # (3) directpo vs TRL on it, same run (the bench picks bf16 where the device runs it fast)
    timeout 210 $PY -m directpo bench --device "$DEVICE" --model /tmp/gpu-model --data $HH --batch 8 \
      --max-length "$MAXLEN" --steps "$STEPS" --rounds 1 --out "$OUT/gpu-$MODEL_SIZE.json" > "$OUT/bench.log" 2>&1
    echo "bench exit $?" >> "$OUT/bench.log"
    tail -n 25 "$OUT/bench.log"
  fi
  if has sample; then  # (4) directpo's sampler against transformers' generate, K = 1 and 16, same rows
    timeout 90 $PY -m directpo bench --sample --device "$DEVICE" --model /tmp/gpu-model --data $HH \
      --sample-k 1,16 --sample-rows "$ROWS" --sample-batch 16 --max-new-tokens 64 --max-length "$MAXLEN" --rounds 1 \
      --out "$OUT/sample-$MODEL_SIZE.json" > "$OUT/sample.log" 2>&1
    echo "sample exit $?" >> "$OUT/sample.log"
    tail -n 12 "$OUT/sample.log"
  fi
  if has e2e; then  # (5) the whole `directpo train` command against TRL's script, by phase
    timeout 100 $PY -m directpo bench --end-to-end --device "$DEVICE" --model /tmp/gpu-model --data $HH \
      --end-to-end-pairs "$PAIRS" --steps "$STEPS" --batch 8 --max-length "$MAXLEN" --rounds 1 \
      --out "$OUT/e2e-$MODEL_SIZE.json" > "$OUT/e2e.log" 2>&1
    echo "e2e exit $?" >> "$OUT/e2e.log"
    tail -n 10 "$OUT/e2e.log"
  fi
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare | run [PARTS] | dry-run [PARTS]  (PARTS: tests,bench,sample,e2e)" >&2
  exit 2
  ;;
esac
