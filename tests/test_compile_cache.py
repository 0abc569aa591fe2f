"""The persistent compilation cache: on by default in jmoe's cache folder, a switch to
turn it off, a directory the user set through JAX kept (each case in a fresh process:
``import jmoe`` decides)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHOW = ("import os, jax, jax.numpy as jnp; {pre}import jmoe; print('DIR', jmoe.compile_cache.current()); "
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
        "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()")


def run(env_extra, pre=""):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JMOE_COMPILATION_CACHE", "JMOE_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR",
                        "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env_extra)
    p = subprocess.run([sys.executable, "-c", SHOW.format(pre=pre)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return next(ln for ln in p.stdout.splitlines() if ln.startswith("DIR")).split(" ", 1)[1]


def test_on_by_default_in_jmoe_cache_folder_and_written(tmp_path):
    assert run({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == str(tmp_path / "xdg" / "jmoe" /
                                                                   "jax_cache")
    assert run({"JMOE_CACHE_DIR": str(tmp_path / "c")}) == str(tmp_path / "c" / "jax_cache")
    written = os.listdir(tmp_path / "c" / "jax_cache")
    assert any(f.startswith("jit_") for f in written), written


def test_switch_off_and_a_users_jax_directory_kept(tmp_path):
    for off in ("0", "off", "false"):
        assert run({"JMOE_COMPILATION_CACHE": off, "JMOE_CACHE_DIR": str(tmp_path)}) == "None"
    assert not (tmp_path / "jax_cache").exists()
    mine = str(tmp_path / "mine")
    assert run({"JMOE_CACHE_DIR": str(tmp_path)},
               pre=f"jax.config.update('jax_compilation_cache_dir', {mine!r}); ") == mine
