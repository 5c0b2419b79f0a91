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
#     run(command="bash scripts/gpu_check.sh run", carry=[".whl", ".gpu"], timeout_s=540)
#   which (1) runs tests/test_cuda.py (FlexAttention with the block mask = per-segment SDPA = the CPU,
#   with gradients; bf16 log-probs within 1e-2 of fp32; a CUDA run follows the CPU run and `auto`
#   picks bf16), (2) builds a Qwen2-0.5B-shaped model with random weights on the GPU machine and
#   (3) runs `directpo bench --device cuda` against TRL on it (bf16 and fp32, same run). Results
#   come back in $OUT: gpu.txt, tests.txt, bench.log, gpu-qwen2-0.5b.json. Budgets inside the
#   540 s: tests 150 s (FlexAttention compiles), the model ~30 s, the bench 330 s (five runs:
#   directpo fp32 and bf16, TRL fp32 live reference, precomputed fp32 and bf16); a bench cut short
#   still leaves each finished run's line in bench.log.
# `bash scripts/gpu_check.sh dry-run` does (2) and (3) here on the CPU with a 2-layer stand-in, to
# check the script itself.
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
  OUT=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIRECTPO_SHARED="$PWD/.gpu/shared"
  if [ "$MODE" = run ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src"
    PY=python3 DEVICE=cuda MODEL_SIZE=qwen2-0.5b
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"
  else
    PY=${PY:-.venv/bin/python} DEVICE=cpu MODEL_SIZE=stand-in
  fi
  $PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)" >> "$OUT/gpu.txt" 2>&1
  if [ "$MODE" = run ]; then  # (1) the CUDA paths against the CPU ones
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/tests.txt" 2>&1
    echo "tests exit $?" >> "$OUT/tests.txt"
  fi
  # (2) the model: built here, random weights (seeded), the tokenizer prepared beside the data
  $PY scripts/gpu_model.py model /tmp/gpu-model .gpu/tokenizer "$MODEL_SIZE" > "$OUT/bench.log" 2>&1 || exit 1
  # (3) directpo vs TRL on it, same run (the bench itself picks bf16 where the device runs it fast)
  timeout 330 $PY -m directpo bench --device "$DEVICE" --model /tmp/gpu-model \
    --data .gpu/shared/data/hh-rlhf/harmless-base-test.jsonl.gz --batch 8 --max-length 512 --steps 10 --rounds 1 \
    --out "$OUT/gpu-$MODEL_SIZE.json" >> "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
  tail -n 25 "$OUT/bench.log"
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare | run | dry-run" >&2
  exit 2
  ;;
esac
