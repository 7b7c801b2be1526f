#!/usr/bin/env bash
# From the folder study.sh ran in: copy each finished run's args.json (dataset path reduced to its file name) and
# scores.json, and the datasets' statistics, into this study folder (never checkpoints or event files).
set -eu
dest=$(cd "$(dirname "$0")" && pwd)
for run in runs/*/; do
  name=$(basename "$run")
  [ -f "$run/scores.json" ] || continue
  mkdir -p "$dest/$name"
  python3 -c "
import json, os, sys
a = json.load(open(sys.argv[1]))
a['dataset_path'] = os.path.basename(a['dataset_path'])
json.dump(a, open(sys.argv[2], 'w'), indent=2)" "$run/args.json" "$dest/$name/args.json"
  cp "$run/scores.json" "$dest/$name/scores.json"
done
for stats in data/*.json; do cp "$stats" "$dest/dataset-$(basename "$stats")"; done
ls "$dest"
