"""The kernel table: which implementation each op uses, decided once from the target.

A program's platform is that of the devices it targets, never the process's default
backend: a TPU program compiled on a laptop (``jmoe plan``) must not contain a CPU
custom call. The platform rides in the config (``config.platform``, a runtime field
like ``mesh``, never saved) and is set where a model meets its devices: ``jmoe.load``
(the devices the params are restored onto, or the mesh), ``jmoe.random_model``,
``jmoe.shard_model``, ``jmoe.aot.plan`` (the target), and ``forward``/``generate`` for a
model built by hand (its params' devices).

``kernels(platform)`` is the table:

| op | cpu | gpu | tpu | None (unknown) |
|---|---|---|---|---|
| router top-k | ``jmoe_top_k`` kernel* | ``lax.top_k`` | ``lax.top_k`` | ``lax.top_k`` |
| attention | ``jmoe_attention`` kernel* (f32), blocked XLA over 512+ keys | ``jax.nn.dot_product_attention`` (XLA/cuDNN pick) | same | same |
| rotary | ``jmoe_rotary`` kernel* (f32) | XLA | XLA | XLA |
| ``moe_backend="auto"`` | ``cpu_gmm``* (f32/bf16), else ``bucketed`` | ``bucketed`` | ``ragged`` | ``bucketed`` |
| Pallas lowering | interpret | Triton (``gpu``) | Mosaic (``tpu``) | interpret |
| XLA options | YNNPACK dot fusion off | XLA's | XLA's | XLA's |

(*) the compiled CPU kernels (``jmoe.cpu_kernels``) when they build here and
``JMOE_CPU_KERNELS`` is not 0; else the XLA path of the same row. The GPU and TPU rows
are chosen for those platforms, not inherited from CPU tuning: the chunked causal and
blocked attention loops were measured to help on CPU only, so accelerators take one
``dot_product_attention`` call and leave the implementation to XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

log = logging.getLogger("jmoe")


def normalize(name: str | None) -> str | None:
    """``"cuda"``/``"rocm"`` -> ``"gpu"``; a name outside ``PLATFORMS`` is a ValueError."""
    if name is None:
        return None
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in PLATFORMS:
        raise ValueError(f"platform={name!r}: expected one of {PLATFORMS} or None")
    return name


def of_devices(devices) -> str:
    """The one platform of ``devices``; devices of mixed platforms are a ValueError."""
    found = {normalize(d.platform) for d in devices}
    if len(found) != 1:
        raise ValueError(f"devices of platforms {sorted(found)}: expected one platform")
    return found.pop()


def of_params(params) -> str | None:
    """The platform the params live on: a committed array's devices; host arrays
    (NumPy) go where ``jit`` puts them, JAX's default device. None for abstract or
    traced params."""
    import numpy as np

    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array):
            return of_devices(leaf.devices())
        if isinstance(leaf, np.ndarray):
            return of_devices(jax.devices()[:1])
    return None


def resolve(config, params=None):
    """``config`` with ``platform`` set: kept if set, else the mesh's devices, else the
    devices the params live on, else left None (the portable XLA table)."""
    if config.platform is not None:
        return config
    if config.mesh is not None:
        return config.replace(platform=of_devices(config.mesh.devices.flat))
    found = of_params(params) if params is not None else None
    return config if found is None else config.replace(platform=found)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementations one platform's programs use (see the module table)."""

    platform: str | None
    blocked_attention: bool     # key-blocked online-softmax attention from 512 keys
    causal_chunks: bool         # causal attention in query chunks that skip later keys
    pallas_lowering: str        # "tpu" (Mosaic) or "gpu" (Triton)
    pallas_interpret: bool      # run Pallas kernels in interpret mode

    @property
    def cpu_kernels(self) -> bool:
        """Whether jmoe's compiled XLA:CPU custom calls are used: CPU targets where they
        build and ``JMOE_CPU_KERNELS`` is not 0 (asked at trace time: the build's
        outcome is cached by ``jmoe.cpu_kernels`` itself)."""
        if self.platform != "cpu":
            return False
        from jmoe import cpu_kernels  # builds the C++ kernels once, on first use

        return cpu_kernels.available()

    def moe_backend(self, backend: str, dtype=None) -> str:
        """``backend``, with ``"auto"`` resolved for this platform and the model's dtype."""
        if backend != "auto":
            return backend
        if self.platform == "tpu":
            choice = "ragged"  # ragged_dot is native only on TPU
        elif self.cpu_kernels and _cpu_gmm_dtype_ok(dtype):
            choice = "cpu_gmm"
        else:
            choice = "bucketed"
        _log_auto(self.platform, choice)
        return choice


def _cpu_gmm_dtype_ok(dtype) -> bool:
    import jax.numpy as jnp

    return dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def _log_auto(platform, choice):
    log.info("jmoe moe_backend=auto picked %r for platform %r", choice, platform)


@functools.cache
def kernels(platform: str | None) -> Kernels:
    """The kernel table of ``platform`` (``"cpu" | "gpu" | "tpu" | None``)."""
    platform = normalize(platform)
    if platform == "cpu":
        return Kernels("cpu", True, True, "tpu", True)
    if platform in ("gpu", "tpu"):
        return Kernels(platform, False, False, platform, False)
    return Kernels(None, False, False, "tpu", True)
