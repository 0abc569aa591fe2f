"""``jit``: ``jax.jit`` with jmoe's per-platform XLA compiler options.

On CPU, jaxlib 0.10's XLA hands dots to its YNNPACK fusion, whose *batched*
matmul at expert shapes (``[64, 128, 256] x [64, 256, 128]``) runs ~2.3x slower
than XLA's own (Eigen) dot emitter; 2-D matmuls are the same either way. jmoe's
expert compute is batched matmuls, so on CPU its compiled functions switch that
fusion off (measured in ``benchmarks/forward.py``: the whole forward ~1.3x faster).
The options go to these compilations only, never to the user's other programs
(so a jmoe function called inside the user's own ``jax.jit`` compiles with the
user's options: pass ``compiler_options=xla_options.compiler_options("cpu")`` there
to keep the speed-up).

The options are probed once: an XLA that no longer knows a flag compiles without
it rather than failing. ``JMOE_XLA_DEFAULTS=1`` keeps XLA's defaults everywhere.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from jmoe.platform import of_params

log = logging.getLogger("jmoe")

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options(platform: str) -> dict | None:
    """The options jmoe compiles with on ``platform`` (None: XLA's defaults)."""
    if platform != "cpu" or os.environ.get("JMOE_XLA_DEFAULTS") == "1":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)(jnp.zeros(()))
    except Exception as err:  # noqa: BLE001 - any rejection means: keep the defaults
        log.info("jmoe: XLA rejected %s (%s); using XLA's defaults", CPU_OPTIONS, err)
        return None
    return dict(CPU_OPTIONS)


class _Jit:
    """A ``jax.jit`` per target platform, built at the first call for it. The platform
    is the ``platform`` of the static ``config`` argument (``jmoe.platform``), else that
    of the devices the array arguments live on. ``lower`` and ``trace`` pick the same
    way; every other attribute (``_cache_size``, ...) is the latest call's jitted
    function's."""

    def __init__(self, fun, jit_kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._by_platform = fun, jit_kwargs, {}
        self._last = None  # the platform of the latest call (what other attributes see)

    def _jitted(self, platform: str | None):
        self._last = platform
        if platform not in self._by_platform:
            options = compiler_options(platform)
            kwargs = dict(self._jit_kwargs, compiler_options=options) if options else self._jit_kwargs
            self._by_platform[platform] = jax.jit(self._fun, **kwargs)
        return self._by_platform[platform]

    def __call__(self, *args, **kwargs):
        return self._jitted(_target(args, kwargs))(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted(_target(args, kwargs)).lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        return self._jitted(_target(args, kwargs)).trace(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_by_platform", "_last"):
            raise AttributeError(name)
        return getattr(self._jitted(self._last), name)


def _target(args, kwargs) -> str | None:
    config = kwargs.get("config")
    if getattr(config, "platform", None) is not None:
        return config.platform
    return of_params(args)


def jit(fun=None, **jit_kwargs):
    """Like ``jax.jit`` (same keywords), compiled with ``compiler_options`` of the target
    platform, decided at each call from its arguments (importing jmoe starts no backend)."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fun, jit_kwargs)
