"""pip install: the package installs from a checkout (divo_utils and the three scripts, nothing else), and what it
installs imports and runs from outside the checkout."""

import os
import subprocess
import sys

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
