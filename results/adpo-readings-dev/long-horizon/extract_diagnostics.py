"""Copy a run's logged ADPO and PAD diagnostics out of its TensorBoard events into `diagnostics.json`.

main's scripts log `adpo/*` and `pad/*` to TensorBoard only (the study commit also wrote them into scores.json), and
event files are not kept in results/. This keeps every logged value at the evaluation steps (every 5,000):

    python results/adpo-readings-dev/long-horizon/extract_diagnostics.py SWEEP_OUT/runs/RUN ... --dest FOLDER

writes FOLDER/RUN/diagnostics.json as {tag: [[step, value], ...]}.
"""

import argparse
import glob
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("runs", nargs="+", help="run folders (each with its events.out.tfevents.* files)")
parser.add_argument("--dest", required=True, help="the results folder the run folders are copied to")
parser.add_argument("--every", type=int, default=5000, help="keep the values logged at multiples of this step")
args = parser.parse_args()

for run in args.runs:
    values: dict[str, dict[int, float]] = {}
    for events in sorted(glob.glob(os.path.join(run, "events.out.tfevents.*"))):  # a resumed run has several
        accumulator = EventAccumulator(events, size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith(("adpo/", "pad/")):
                values.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)
                                                   if e.step % args.every == 0})
    if not values:
        raise SystemExit(f"error: no adpo/* or pad/* values in {run} (a --no-adpo run logs none)")
    target = os.path.join(args.dest, os.path.basename(os.path.normpath(run)))
    os.makedirs(target, exist_ok=True)
    lines = [f"  {json.dumps(tag)}: {json.dumps([[s, round(v, 5)] for s, v in sorted(steps.items())])}"
             for tag, steps in sorted(values.items())]  # one tag a line
    with open(os.path.join(target, "diagnostics.json"), "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {os.path.join(target, 'diagnostics.json')} ({len(values)} tags)")
