"""pip install: the package installs from a checkout (divo_utils and the three scripts, nothing else), and what it
installs imports and runs from outside the checkout."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import tyro

import divo_antmaze
import divo_continuous
import pad_pretrain
from conftest import ROOT


def test_pip_installs_the_package_and_the_scripts(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), ROOT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = sorted(name for name in os.listdir(target) if not name.endswith(".dist-info") and name != "__pycache__")
    assert installed == ["divo_antmaze.py", "divo_continuous.py", "divo_utils", "pad_pretrain.py"]
    code = ("import divo_utils, divo_utils.files, divo_continuous; print(divo_utils.__file__); "
            "print(divo_continuous.__file__); print(divo_utils.domain_of('antmaze-umaze-v2'))")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    package, script, domain = proc.stdout.split()
    assert package.startswith(str(target)) and script.startswith(str(target)) and domain == "antmaze"
    proc = subprocess.run([sys.executable, str(target / "divo_continuous.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--env-id" in proc.stdout, proc.stderr


def test_the_readmes_training_commands_parse():
    """Every `python <script>.py ...` line of the README's shell blocks is accepted by that script's arguments (a
    renamed or removed flag, or a value out of range, fails here before a newcomer meets it)."""
    scripts = {"divo_continuous.py": divo_continuous, "divo_antmaze.py": divo_antmaze, "pad_pretrain.py": pad_pretrain}
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.split("#")[0].split("&&")[-1].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("python ") and "<" not in line
                and "--help" not in line and line.split()[1] in scripts]
    assert len(commands) >= 6, commands
    for script, *argv in commands:
        try:
            tyro.cli(scripts[script].Args, args=argv)
        except SystemExit:
            pytest.fail(f"the README's `python {script} {' '.join(argv)}` does not parse")
