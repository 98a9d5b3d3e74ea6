#!/bin/sh
# Issue 10 part 5 (RESULTS.md, "The default recipe"): plain `vaeml train`'s measured recipe
# (IWAE-5 for 4/5 of the epochs at lr 1e-3, then unbiased S = 10 at 3e-5) against the old default
# (`--warm-start-epochs 0`: unbiased from the first step at 1e-3) and IWAE-5 throughout, at equal
# epochs: 10 epochs of the first 10,000 MNIST images (1,000 steps); test LL by IS with K = 1000 on
# the first 1,000 test images, and the recipe's last warm-start checkpoint (epoch 8, its start) scored the same way.
# Run from the repository root with VAEML_DATA_DIR set; ~10 min for 3 seeds on 2 idle cores.
# Resumable: finished runs are skipped.
set -e
OUT=${OUT:-runs/recipe_check}
C=${C:-"--epochs 10 --max-train-examples 10000 --no-progress"}  # overridable for a smoke run
E=${E:-"-K 1000 --max-test-examples 1000"}
WARM=${WARM:-8}  # the recipe's warm-start epochs: int(0.8 * epochs)
for s in ${SEEDS:-0 1 2}; do
  for v in recipe old iwae5; do
    d=$OUT/$v/seed$s
    case $v in
      recipe) f="" ;;
      old) f="--warm-start-epochs 0" ;;
      iwae5) f="--estimator iwae --num-particles 5" ;;
    esac
    [ -f "$d/eval.json" ] && continue
    r=""; [ -f "$d/config.json" ] && r="--resume"
    vaeml train $C $f --seed "$s" --out "$d" $r
    vaeml evaluate "$d" $E --output "$d/eval.json" > /dev/null
    if [ "$v" = recipe ]; then
      vaeml evaluate "$d" $E --epoch "$WARM" --output "$d/eval_start.json" > /dev/null
    fi
  done
done
echo "done: $OUT/*/seed*/eval.json"
