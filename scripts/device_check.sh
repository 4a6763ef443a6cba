#!/usr/bin/env bash
# The GPU checks in one command (issue #13), <= 8 minutes on one H100:
#   scripts/device_check.sh OUT_DIR            on a machine with jax[cuda]
#   scripts/device_check.sh OUT_DIR --dry-run  the same code on tiny shapes, on CPU (the suite runs this)
# Writes its JSON lines to OUT_DIR (device.json, bench_accel.jsonl, gpu_tests.log) and prints them.
# On a machine without network: run it from the checkout with PYTHONPATH=. (set here), or after
# `pip install --no-deps -e .`; jax, flax, optax and orbax-checkpoint must already be installed.
set -uo pipefail
out="${1:?usage: scripts/device_check.sh OUT_DIR [--dry-run]}"
dry="${2:-}"
if [ -n "$dry" ] && [ "$dry" != "--dry-run" ]; then
  echo "usage: scripts/device_check.sh OUT_DIR [--dry-run]" >&2; exit 2
fi
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
if [ -n "$dry" ]; then
  export JAX_PLATFORMS=cpu
  python scripts/bench_accel.py --dry-run --out "$out" || status=1
  exit $status
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
python -c "import json, jax, flax, optax, orbax.checkpoint as oc; print(json.dumps({'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__, 'orbax_checkpoint': getattr(oc, '__version__', None), 'devices': [d.device_kind for d in jax.devices()]}))" \
  | tee "$out/device.json"
# 1. The tests marked gpu: bf16 train-step equivalence and generation exactness on the device.
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -n 15 || status=1
# 2-3. The 124M train step (attention x remat) and bf16 generation against the HBM roofline.
timeout 240 python scripts/bench_accel.py train generate --out "$out" || status=1
# 4. The mesh step against pmap, and int8, beam search and speculative decoding in bf16.
timeout 130 python scripts/bench_accel.py mesh decoding --out "$out" || status=1
exit $status
