"""Run a script as `python kill_at.py FILE SCRIPT ARGS...`, killing it with SIGKILL at the moment it would put FILE in
place (just before the atomic rename of FILE.tmp to FILE): a real kill at an exact point of a run's writes."""

import os
import runpy
import signal
import sys

target, script = sys.argv[1], sys.argv[2]
rename = os.replace


def replace_or_die(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)


os.replace = replace_or_die
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does: divo_utils is found beside it
runpy.run_path(script, run_name="__main__")
