"""JAX's persistent compilation cache, on by default for jmoe.

A full-size ``jmoe.generate`` compiles for minutes on CPU; with the cache, a second
process with the same shapes and options reads the compiled program from disk
instead (measured in ``benchmarks/real_scale.py``). ``import jmoe`` turns the cache
on unless the user already chose one:

- directory: ``jax_cache`` in jmoe's cache folder, as the compiled CPU kernels use it
  (``jmoe.cpu_kernels``): ``$JMOE_CACHE_DIR/jax_cache`` if ``JMOE_CACHE_DIR`` is set,
  else ``$XDG_CACHE_HOME/jmoe/jax_cache`` (default ``~/.cache/jmoe/jax_cache``);
- ``JMOE_COMPILATION_CACHE=0`` (or ``off`` / ``false``) leaves JAX's cache off;
- a cache directory already set through JAX (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before ``import jmoe``)
  is kept as it is.

Only programs that took at least ``jax_persistent_cache_min_compile_time_secs``
(JAX's default, 1 s) to compile are written, so small functions do not fill the
directory. ``enable(path)`` / ``disable()`` change it at run time.
"""

from __future__ import annotations

import os

import jax

OFF_VALUES = ("0", "off", "false", "no")


def default_dir() -> str:
    """``$JMOE_CACHE_DIR/jax_cache``, else ``$XDG_CACHE_HOME/jmoe/jax_cache`` (``~/.cache``
    default)."""
    if os.environ.get("JMOE_CACHE_DIR"):
        return os.path.join(os.path.expanduser(os.environ["JMOE_CACHE_DIR"]), "jax_cache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jmoe", "jax_cache")


def enable(path: str | os.PathLike | None = None) -> str:
    """Turn JAX's persistent compilation cache on in ``path`` (default ``default_dir()``);
    returns the directory. It is created when JAX first writes to it."""
    path = os.fspath(path) if path is not None else default_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def disable() -> None:
    """Turn JAX's persistent compilation cache off for this process."""
    jax.config.update("jax_compilation_cache_dir", None)


def current() -> str | None:
    """The cache directory in use, or None when the cache is off."""
    return jax.config.jax_compilation_cache_dir


def enable_by_default() -> str | None:
    """What ``import jmoe`` does: ``enable()`` unless ``JMOE_COMPILATION_CACHE`` is off or
    a JAX cache directory is already set. Returns the directory in use (None: off)."""
    if os.environ.get("JMOE_COMPILATION_CACHE", "1").strip().lower() in OFF_VALUES:
        return current()
    if current():
        return current()
    return enable()
