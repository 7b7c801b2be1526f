#!/usr/bin/env bash
# The relabelled AntMaze study's runs, one after another on one core; a finished run is skipped, an interrupted one
# resumed. Run from a folder holding data/ (the files of README.md's commands).
set -u
ARMS=${ARMS:-divo td3bc}  # e.g. ARMS=td3bc for a second stream on another core
SEEDS=${SEEDS:-0 1 2}     # two streams of one arm must be given different seeds
TASKS=${TASKS:-antmaze-umaze-diverse-relabelled:antmaze-umaze-diverse-v2 antmaze-umaze-relabelled:antmaze-umaze-v2}
CODE=${CODE:-../..}       # a checkout of the code the study ran (see README)
for task in $TASKS; do
  name=${task%%:*}; env_id=${task##*:}
  for seed in $SEEDS; do
    for arm in $ARMS; do
      run=${name}__${arm}__${seed}
      [ -f runs/$run/scores.json ] && continue
      extra=(); [ "$arm" = td3bc ] && extra=(--no-adpo)
      if [ -f runs/$run/checkpoint.pt ]; then
        OMP_NUM_THREADS=1 python "$CODE/divo_antmaze.py" --resume runs/$run/checkpoint.pt --no-cuda
      else
        rm -rf runs/$run  # a folder with no checkpoint holds nothing to keep
        OMP_NUM_THREADS=1 python "$CODE/divo_antmaze.py" --env-id $env_id --dataset-path data/$name.hdf5 --seed $seed \
          --exp-name $arm --run-name $run --total-timesteps 100000 --eval-freq 20000 --eval-episodes 100 \
          --checkpoint-freq 5000 --no-cuda "${extra[@]}"
      fi
    done
  done
done
