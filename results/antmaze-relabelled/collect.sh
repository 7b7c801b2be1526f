#!/usr/bin/env bash
# From the folder study.sh ran in: copy each finished run's args.json (dataset path reduced to its file name) and
# scores.json, and the datasets' statistics, into this study folder (never checkpoints or event files).
set -eu
dest=$(cd "$(dirname "$0")" && pwd)
keep() {  # a committed result is never overwritten: a different file already there is left, and said
  if [ -f "$2" ] && ! cmp -s "$1" "$2"; then echo "kept $2 (differs from $1; not overwritten)" >&2; else cp "$1" "$2"; fi
}
for run in runs/*/; do
  name=$(basename "$run")
  [ -f "$run/scores.json" ] || continue
  mkdir -p "$dest/$name"
  python3 -c "
import json, os, sys
a = json.load(open(sys.argv[1]))
a['dataset_path'] = os.path.basename(a['dataset_path'])
json.dump(a, open(sys.argv[2], 'w'), indent=2)" "$run/args.json" "$run/args.committed.json"
  keep "$run/args.committed.json" "$dest/$name/args.json"
  keep "$run/scores.json" "$dest/$name/scores.json"
done
for stats in data/*.json; do keep "$stats" "$dest/dataset-$(basename "$stats")"; done
ls "$dest"
