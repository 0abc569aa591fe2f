"""Expert parallelism on 8 virtual CPU devices (issue 6).

The checks live in ``tests/sharding_checks.py``: jax fixes its device count when it
starts, so they run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu`` and each
is reported here as its own test. They compare the expert-parallel MoE layer with
a NumPy oracle and with the single-device layer, and the whole model (OLMoE token
choice with budgets and expert choice, LLaDA2), ``jmoe.load(path, mesh=...)`` and
``generate`` with the same model unsharded, on meshes (data=1, expert=8) and
(data=2, expert=4).
"""

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sharding_checks.py")
with open(SCRIPT) as _f:
    CHECK_NAMES = re.findall(r"^@check\ndef (\w+)", _f.read(), flags=re.M)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env,
                          timeout=900, cwd=os.path.dirname(HERE))
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[r["name"]] = r
    if not out:
        pytest.fail(f"sharding_checks.py reported nothing (rc={proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def test_checks_were_found():
    assert len(CHECK_NAMES) >= 10, CHECK_NAMES


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_expert_parallel(results, name):
    if name not in results:
        pytest.fail(f"check {name} did not report (the subprocess stopped early)")
    r = results[name]
    assert r["ok"], r["error"]
