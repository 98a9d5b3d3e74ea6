#!/bin/sh
# The work queue's accelerator measurements, prepared as ONE call on a GPU machine (not yet run on
# one). Three steps, each writing its own file under $OUT so that a
# step cut by the time limit leaves the earlier ones:
#   1. unroll_s10.txt: the plain loop with unroll = 1, 2, 4, 8 coupled iterations per while_loop
#      step against the 25-slot queue, paired per call (queue_variants.py, S = 10);
#   2. cost.txt / cost.json: the work queue's cost targets on the accelerator (estimator_cost.py, S = 5, 10,
#      50: plain loop and the 25-slot queue, trained and at init);
#   3. cpu16_s50.txt: the same machine's 16 CPU threads (JAX_PLATFORMS=cpu): the library's IWAE-50
#      gradient / the hand-written floor with and without the one-pass hooks (1.44x measured earlier
#      on that CPU), and the 25-slot queue at S = 50.
# On an H100 the whole estimator_cost run took a few minutes; sized for < 9 minutes.
# Run from the repository root with VAEML_DATA_DIR set. With the `device` tool (its image has jax,
# flax, optax, orbax and chex; the repository's own package goes on PYTHONPATH), once here:
#   mkdir -p runs/gpu_data/mnist && cp "$VAEML_DATA_DIR"/mnist/train-images-idx3-ubyte.gz runs/gpu_data/mnist/
# then run(command="VAEML_DATA_DIR=runs/gpu_data PYTHONPATH=. sh benchmarks/gpu_cost.sh",
#          carry=["runs/gpu_data"], timeout_s=590); the files come back from $OUT.
# QUICK=1 shrinks every step to a smoke run (CPU, a few minutes, mostly compilation).
set -e
OUT=${OUT:-runs/gpu_cost}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
  Q1="--calls 2 --train-steps 2 --max-iters 50"
  Q2="--quick"
  Q3="--calls 2 --train-steps 2 --max-iters 50"
else
  Q1="--calls 30"
  Q2="--num-particles 5 10 50 --repeats 10 --unbiased-repeats 6 --num-slots 25"
  Q3="--calls 20"
fi
export PYTHONUNBUFFERED=1
python benchmarks/queue_variants.py --num-particles 10 $Q1 \
  --variants slots=0 slots=0,unroll=2 slots=0,unroll=4 slots=0,unroll=8 slots=25 \
  > "$OUT/unroll_s10.txt" 2>&1
python benchmarks/estimator_cost.py $Q2 --json "$OUT/cost.json" > "$OUT/cost.txt" 2>&1
JAX_PLATFORMS=cpu python benchmarks/queue_variants.py --num-particles 50 $Q3 --iwae-hook \
  --variants slots=25 > "$OUT/cpu16_s50.txt" 2>&1
echo "done: $OUT/unroll_s10.txt $OUT/cost.txt $OUT/cpu16_s50.txt"
