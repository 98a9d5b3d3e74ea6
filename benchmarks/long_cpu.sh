#!/bin/sh
# Longer runs at CPU scale (RESULTS.md, "Longer runs on all of MNIST, CPU scale"): for each
# seed, IWAE-5 on all 60,000 MNIST images for 20 epochs (12,000 steps, lr 1e-3), then 3,000 steps
# from the same parameters and Adam state of IWAE-5 (Adam 3e-4 and 3e-5) and of the unbiased
# estimator (S = 5, Adam 3e-5); K = 1000 IS on the first 2,000 test images, paired per image.
# Run from the repository root with VAEML_DATA_DIR set; ~25 min per seed on 2 idle cores.
# Resumable: finished warm starts resume, finished rows are skipped (<work>/rows.jsonl).
set -e
OUT=${OUT:-runs/long_cpu}
for s in ${SEEDS:-0 1 2}; do
  w=$OUT/warm/seed$s
  r=""; [ -f "$w/config.json" ] && r="--resume"
  vaeml train --estimator iwae -S 5 --epochs 20 --lr 1e-3 --seed "$s" --out "$w" --no-progress \
    --checkpoint-every 5 $r
  C="--warm-run $w --train-examples 60000 --steps 3000 --work $OUT/study_seed$s --seed $s --eval-examples 2000"
  python benchmarks/optimizer_study.py $C --estimators iwae5 --optimizers adam adam@3e-5
  python benchmarks/optimizer_study.py $C --estimators unbiased5 --optimizers adam@3e-5
done
