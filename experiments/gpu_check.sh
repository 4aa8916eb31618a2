#!/usr/bin/env bash
# One short GPU check (< 7 minutes on one H200): Mult-VAE and RecVAE training and evaluation
# throughput and EASE's fit with the project's own benchmarks, written as JSON lines to
# $OUT/gpu_check.jsonl (or ./gpu_check.jsonl when OUT is unset).
#
#   bash experiments/gpu_check.sh
#
# Targets (ML-20M shape, bf16): >= 3,000,000 training users/s at batch 24,576;
# evaluation of 10,000 users (top-100 over all items) in <= 50 ms. Plus a
# Pinterest-shaped catalogue (2,565,241 items) training a few steps at a batch that
# fits, with its peak device memory; on 2+ GPUs the same catalogue split over them
# (--mesh=1xN) and data parallelism Nx1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.jsonl"
mkdir -p "$(dirname "$out")"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
py="${PYTHON:-python}"
bench() { echo "== $*" >&2; "$py" -m experiments.benchmark --json_out="$out" "$@" | tail -n 4; }

"$py" - <<'PY'
import jax
backend = jax.default_backend()
print("devices:", jax.devices())
if backend != "gpu":
  raise SystemExit(f"gpu_check: expected a GPU backend, got {backend!r}")
PY

# ML-20M shape, batch 24,576: 5 steps an epoch, so time 3 epochs; evaluate the 10,000
# held-out users as one batch.
bench --precision=bf16 --batch_size_train=24576 --epochs=3 --eval_users=10000 \
  --batch_size_validation=10000
# The same with larger output-layer chunks (the default, 1,024 users, was chosen on CPU).
bench --precision=bf16 --batch_size_train=24576 --epochs=2 --eval_users=10000 \
  --batch_size_validation=10000 --output_chunk_size=8192
# ML-20M shape, batch 500: one full epoch (234 steps).
bench --precision=bf16 --batch_size_train=500 --epochs=1 --eval_users=0
# RecVAE at ML-20M shape, batch 500 (the paper's): one round (3 encoder + 1 decoder
# passes) against a Mult-VAE epoch timed in the same run, 40 steps a pass extrapolated.
bench --model=recvae --precision=bf16 --batch_size_train=500 --steps=40 --eval_users=0
# Pinterest-shaped catalogue: 2,565,241 items (~3.1e9 parameters with Adam's moments:
# ~49 GB), batch 1,024 (logits ~10 GB per copy), 5 steps extrapolated.
bench --precision=bf16 --batch_size_train=1024 --n_items=2565241 --n_users=50000 \
  --mean_per_user=20 --steps=5 --eval_users=0
# Item sharding (--mesh=DxM): only with 2 or more GPUs. The Pinterest shape on 1xN
# against 1x1's state bytes, and data parallelism Nx1 against 1x1 at the same batch.
n_gpus="$("$py" -c 'import jax; print(jax.local_device_count())')"
if [ "$n_gpus" -ge 2 ]; then
  bench --precision=bf16 --batch_size_train=1024 --n_items=2565241 --n_users=50000 \
    --mean_per_user=20 --steps=5 --eval_users=1000 --mesh="1x$n_gpus"
  bench --precision=bf16 --batch_size_train=24576 --steps=5 --eval_users=0 --mesh=1x1
  bench --precision=bf16 --batch_size_train=24576 --steps=5 --eval_users=0 \
    --mesh="${n_gpus}x1"
fi
# EASE at ML-20M's shape (20,108 items): one fit against NumPy / SciPy of the same Gram
# matrix (float32 on the host), and ten l2 values from one eigendecomposition against ten
# fits, 10,000 users scored by each.
echo "== bench_ease" >&2
"$py" -m experiments.bench_ease --references=numpy32,scipy32 \
  --out="$(dirname "$out")/bench_ease.json" | tail -n 9
echo "gpu_check: results in $out" >&2
