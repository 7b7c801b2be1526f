#!/usr/bin/env bash
# The AntMaze study's runs, one after another on one core; a finished run is skipped, an interrupted one resumed.
set -u
ARMS=${ARMS:-divo td3bc}  # e.g. ARMS=td3bc for a second stream on another core, which then never meets the first
CODE=${CODE:-../..}  # a checkout of the code the study ran (see README); run from a folder holding data/
for task in antmaze-umaze-local:antmaze-umaze-v2 antmaze-umaze-diverse-local:antmaze-umaze-diverse-v2; do
  name=${task%%:*}; env_id=${task##*:}
  for seed in 0 1 2; do
    for arm in $ARMS; do
      run=${name}__${arm}__${seed}
      [ -f runs/$run/scores.json ] && continue
      extra=(); [ $arm = td3bc ] && extra=(--no-adpo)
      if [ -f runs/$run/checkpoint.pt ]; then
        OMP_NUM_THREADS=1 python $CODE/divo_antmaze.py --resume runs/$run/checkpoint.pt --no-cuda
      else
        rm -rf runs/$run
        OMP_NUM_THREADS=1 python $CODE/divo_antmaze.py --env-id $env_id --dataset-path data/$name.hdf5 --seed $seed \
          --exp-name $arm --run-name $run --total-timesteps 100000 --eval-freq 20000 --eval-episodes 100 \
          --checkpoint-freq 5000 --no-cuda "${extra[@]}"
      fi
    done
  done
done
