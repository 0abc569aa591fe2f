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

With bfloat16 (or float16) weights on CPU, XLA converts each dense weight to
float32 for its dots (XLA:CPU has no low-precision GEMM) and its while-loop
invariant code motion hoists those converts out of the sampler's loop: a float32
copy of every non-expert weight (embedding, LM head, attention) stays alive for the
whole generate (measured: peak 1.30x the bf16 weights of LLaDA-MoE-7B, 0.97x extra
on a 2-layer one). jmoe's CPU compilations of low-precision models turn that pass
off, so a weight is converted where it is used and freed (0.54x extra on the 2-layer
model, ~11% slower there, where the LM head is half the weights).

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
# low-precision weights on CPU: no float32 weight copies hoisted out of loops
CPU_LOW_PRECISION_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
LOW_PRECISION = ("bfloat16", "float16")


@functools.cache
def compiler_options(platform: str, low_precision: bool = False) -> dict | None:
    """The options jmoe compiles with on ``platform`` (None: XLA's defaults);
    ``low_precision``: the weights are bfloat16 or float16."""
    if platform != "cpu" or os.environ.get("JMOE_XLA_DEFAULTS") == "1":
        return None
    options = dict(CPU_OPTIONS, **(CPU_LOW_PRECISION_OPTIONS if low_precision else {}))
    try:
        jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros(()))
    except Exception as err:  # noqa: BLE001 - any rejection means: keep the defaults
        log.info("jmoe: XLA rejected %s (%s); using XLA's defaults", options, err)
        return None
    return options


class _Jit:
    """A ``jax.jit`` per target platform, built at the first call for it. The platform
    is the ``platform`` of the static ``config`` argument (``jmoe.platform``), else that
    of the devices the array arguments live on. ``lower`` and ``trace`` pick the same
    way; every other attribute (``_cache_size``, ...) is the latest call's jitted
    function's."""

    def __init__(self, fun, jit_kwargs):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._by_platform = fun, jit_kwargs, {}
        self._last = (None, False)  # the latest call's target (what other attributes see)

    def _jitted(self, target: tuple):
        self._last = target
        if target not in self._by_platform:
            options = compiler_options(*target) if target[0] is not None else None
            kwargs = dict(self._jit_kwargs, compiler_options=options) if options else self._jit_kwargs
            self._by_platform[target] = jax.jit(self._fun, **kwargs)
        return self._by_platform[target]

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


def _target(args, kwargs) -> tuple:
    """``(platform or None, low_precision)`` of a call."""
    config = kwargs.get("config")
    platform = getattr(config, "platform", None) or of_params(args)
    low = str(getattr(config, "dtype", "")) in LOW_PRECISION
    return platform, low


def jit(fun=None, **jit_kwargs):
    """Like ``jax.jit`` (same keywords), compiled with ``compiler_options`` of the target
    platform, decided at each call from its arguments (importing jmoe starts no backend)."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fun, jit_kwargs)
