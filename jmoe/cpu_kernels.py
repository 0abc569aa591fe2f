"""jmoe's compiled XLA:CPU kernels: ``cpu_gmm`` experts, router top-k, attention, rotary.

``jmoe/csrc/cpu_kernels.cc`` holds four XLA FFI custom calls, each sharing its work
over XLA's CPU thread pool:

- ``grouped_swiglu``: each expert multiplies exactly its own rows (no per-expert
  capacity padding), gate/up with SiLU in one register tile (AVX-512 or AVX2), down,
  the combine weight, and for token choice each token's sum; float32 or bfloat16
  arrays (a ``_bf16`` variant), float32 arithmetic;
- ``top_k_ids``: the routers' top-k (XLA's TopK runs on one thread);
- ``attention``: softmax attention in the projections' own layouts;
- ``rotary``: NeoX rotary embedding (XLA fuses the tables' cos and sin into each use
  and evaluates them per head and layer).

The C++ file is compiled on first use with the machine's C++ compiler (``$CXX``,
else ``c++``/``g++``/``clang++``) for the host CPU (``-march=native``) into a cache
folder (``$JMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/jmoe`` or ``~/.cache/jmoe``),
keyed by the source, flags, compiler, jax version and CPU, and registered with
``jax.ffi``. The build writes a temporary file and renames it, so an interrupted
build leaves nothing half-written. Large scratch buffers are kept between calls
(page faults on fresh ones cost more than the work): one per concurrent call, each
as large as the largest use.

``moe_backend="auto"`` picks ``cpu_gmm`` on CPU when it builds (and the model is
float32 or bfloat16), and the routers, float32 attention and rotary use the kernels
there; ``JMOE_CPU_KERNELS=0`` turns all of them off. Without a compiler jmoe logs one warning
and uses ``bucketed``, ``lax.top_k`` and the XLA attention and rotary; an explicit
``moe_backend="cpu_gmm"`` then raises a ``RuntimeError`` carrying the compiler's
message.

Example:
    if jmoe.cpu_kernels.available():
        model = jmoe.load(path, moe_backend="cpu_gmm")
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger("jmoe")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"  # includes csrc/cpu_common.h
KERNELS = ("jmoe_grouped_swiglu", "jmoe_grouped_swiglu_bf16", "jmoe_top_k", "jmoe_attention",
           "jmoe_rotary")  # FFI handler symbols in SOURCE
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")

_LOCK = threading.Lock()
_TARGETS: dict[tuple[str, ...], str] = {}  # extra flags -> registered target name suffix
_LIBS: list = []  # keep the loaded libraries alive
_FAILED: dict[tuple[str, ...], str] = {}


def compiler() -> str | None:
    """Path of the C++ compiler to use, or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    if os.environ.get("JMOE_CACHE_DIR"):
        return Path(os.environ["JMOE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jmoe"


def _cpu_identity() -> str:
    # -march=native binaries are only valid on the CPU they were built for
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernel (once per source/flags/compiler/jax/CPU) and return the library path.

    Raises ``RuntimeError`` with the compiler's output when it cannot be built.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++): jmoe's CPU "
                           "kernels cannot be built; use moe_backend='bucketed'")
    flags = FLAGS + tuple(extra_flags)
    sources = b"\0".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]*")))
    key = hashlib.sha256(b"\0".join([sources, " ".join(flags).encode(), cxx.encode(),
                                     jax.__version__.encode(), _cpu_identity().encode()]))
    out = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building jmoe's CPU kernels failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr.strip()[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def target(extra_flags: tuple[str, ...] = ()) -> str:
    """Build and register the kernels; return the suffix of their FFI target names
    (``RuntimeError`` if they cannot be built). ``extra_flags`` builds a variant (tests
    use ``-mno-avx512f`` to run the AVX2 tiles on an AVX-512 machine)."""
    extra_flags = tuple(extra_flags)
    with _LOCK:
        if extra_flags in _TARGETS:
            return _TARGETS[extra_flags]
        if extra_flags in _FAILED:
            raise RuntimeError(_FAILED[extra_flags])
        try:
            lib = ctypes.CDLL(str(build(extra_flags)))
        except (RuntimeError, OSError) as err:
            _FAILED[extra_flags] = str(err)
            raise RuntimeError(str(err)) from None
        suffix = "" if not extra_flags else (
            "_" + hashlib.sha256(" ".join(extra_flags).encode()).hexdigest()[:8])
        for symbol in KERNELS:
            jax.ffi.register_ffi_target(symbol + suffix, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        _LIBS.append(lib)
        _TARGETS[extra_flags] = suffix
        return suffix


def available() -> bool:
    """True when the kernel is enabled (``JMOE_CPU_KERNELS`` is not ``0``) and builds here.

    A failed build is logged once (WARNING on the ``jmoe`` logger) and not retried.
    """
    if os.environ.get("JMOE_CPU_KERNELS", "1") == "0":
        return False
    failed_before = () in _FAILED
    try:
        target()
        return True
    except RuntimeError as err:
        if not failed_before:
            log.warning("jmoe: the compiled CPU kernels are unavailable (moe_backend 'auto' "
                        "uses 'bucketed' on CPU, routers use lax.top_k): %s", err)
        return False


# the kernel's gate activations and their attribute values
GATE_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def grouped_swiglu(x_TD, token_A, expert_A, weight_A, w_gate_EDF, w_up_EDF, w_down_EFD,
                   *, combine_k: int = 0, variant: tuple[str, ...] = (),
                   activation: str = "silu"):
    """The raw expert kernel. Row a's output is
    ``weight[a] * SwiGLU_{expert[a]}(x[token[a]])``, zero where ``expert[a] >= E``
    (dropped); the kernel groups the rows by expert itself (a counting sort).
    ``combine_k=0``: ``y[A, D]``, one row per assignment. ``combine_k=K`` (token-major
    routings, ``A == T*K``): ``y[T, D]``, the sum of each token's K rows, computed
    in the kernel so the traffic follows the live assignments. ``activation``: the
    gate's, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, DiffusionGemma).

    x and the expert weights are all float32 or all bfloat16 (y has their dtype; the
    arithmetic is float32 either way); ids int32, ``weight_A`` float32."""
    a, t = token_A.shape[0], x_TD.shape[0]
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {tuple(GATE_ACTIVATIONS)}")
    if combine_k and a != t * combine_k:
        raise ValueError(f"combine_k={combine_k}: needs A == T*K, got A={a}, T={t}")
    dtypes = {jnp.dtype(w.dtype) for w in (x_TD, w_gate_EDF, w_up_EDF, w_down_EFD)}
    if len(dtypes) != 1 or not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}:
        raise ValueError(f"x and expert weights must all be float32 or all bfloat16, got "
                         f"{sorted(str(d) for d in dtypes)}")
    suffix = "_bf16" if x_TD.dtype == jnp.bfloat16 else ""
    out = jax.ShapeDtypeStruct((t if combine_k else a, x_TD.shape[1]), x_TD.dtype)
    call = jax.ffi.ffi_call("jmoe_grouped_swiglu" + suffix + target(variant), out,
                            vmap_method="sequential")
    return call(x_TD, token_A.astype(jnp.int32), expert_A.astype(jnp.int32),
                weight_A.astype(jnp.float32), w_gate_EDF, w_up_EDF, w_down_EFD,
                combine_k=int(combine_k), activation=GATE_ACTIVATIONS[activation])


def top_k_ids(x_TE, k: int, *, variant: tuple[str, ...] = ()):
    """Ids ``[T, K]`` int32 of each row's k largest entries of float32 ``x_TE``, largest
    first, equal values lower index first: ``jax.lax.top_k(x_TE, k)[1]``."""
    t, e = x_TE.shape
    if not 1 <= k <= e:
        raise ValueError(f"k={k}: expected 1 <= k <= {e} (the row length)")
    out = jax.ShapeDtypeStruct((t, k), jnp.int32)
    call = jax.ffi.ffi_call("jmoe_top_k" + target(variant), out, vmap_method="sequential")
    return call(jax.lax.stop_gradient(x_TE.astype(jnp.float32)))  # ids carry no gradient


def attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, *, causal: bool = False,
              variant: tuple[str, ...] = ()):
    """Softmax attention (float32) in the projections' layouts: q ``[B, L, H, K]``, k and
    v ``[B, S, N, K]`` (N divides H: grouped-query heads), additive ``bias``
    ``[B or 1, 1, L or 1, S]``; scale ``K ** -0.5``; out ``[B, L, H, K]``. ``causal``
    (L == S, the bias hiding keys past each query) skips those keys."""
    out = jax.ShapeDtypeStruct(q_BLHK.shape, jnp.float32)
    call = jax.ffi.ffi_call("jmoe_attention" + target(variant), out, vmap_method="sequential")
    return call(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal=bool(causal))


def rotary(x_BLHK, cos_BLR, sin_BLR, *, variant: tuple[str, ...] = ()):
    """NeoX-style rotary embedding on the first R dims of each head (float32):
    ``layers.apply_rope``'s values."""
    call = jax.ffi.ffi_call("jmoe_rotary" + target(variant),
                            jax.ShapeDtypeStruct(x_BLHK.shape, jnp.float32),
                            vmap_method="sequential")
    return call(x_BLHK, cos_BLR, sin_BLR)
