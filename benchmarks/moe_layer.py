"""One MoE layer at OLMoE-like proportions: fixed top-8 vs mean per-token budgets 4 and 2.

Run: python benchmarks/moe_layer.py [--tokens 4096 --d 512 --f 256 --experts 64 --topk 8]
     python benchmarks/moe_layer.py --tokens 1024 --repeats 2 --backends ragged  (slow on CPU)

For every expert backend that runs here (cpu_gmm on CPU where its kernel builds;
ragged only where ``ragged_dot`` is native or with --slow; pallas only on GPU/TPU,
not in CPU interpret mode) it times the
jitted layer (router + masked top-k + experts + combine), all in one run (best of
``--repeats`` rounds, each round timing every budget and a reference matmul once,
so a busy machine slows them alike), and prints: time, the time ratio to the same
backend's fixed top-8, the live (token, expert) pairs, how many of the E
experts they touch and the largest expert load over the mean, and achieved GFLOP/s on the routed work (pairs x 6*D*F)
against a plain dense 2048^3 matmul on the same device (``ratio``).
Budgets are drawn per token, uniformly: mean 4 from 1..7, mean 2 from 1..3.
The script runs unchanged on CPU, GPU and TPU and prints the device it ran on.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import cpu_kernels, moe, routing, xla_options


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each ``fn()`` and of its first call (compilation included):
    one warm-up call each, then ``repeats`` rounds that run every fn once, so a busy
    machine slows all alike."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, first


def dense_matmul(n, dtype):
    """A plain ``[n, n] @ [n, n]`` matmul: the machine's reference rate (2 n^3 FLOPs)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda a: a @ a)
    return lambda: f(x)


def available_backends(slow: bool) -> list[str]:
    platform = jax.default_backend()
    names = ["bucketed", "dense"]
    if platform == "cpu" and cpu_kernels.available():
        names.insert(0, "cpu_gmm")  # the compiled CPU kernel (jmoe.cpu_kernels)
    if platform == "tpu" or slow:
        names.append("ragged")  # XLA expands ragged_dot densely off TPU (~80x slower on CPU)
    try:
        import pallas_kernels.moe_gmm.api  # noqa: F401
    except ImportError:
        pass
    else:
        if platform in ("tpu", "gpu") or slow:
            names.append("pallas")
    return names


def make_layer(backend, k_max, bias_E):
    @xla_options.jit  # jmoe's compiler options, as inside jmoe.forward
    def layer(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, budget_T):
        logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32),
                               router_DE.astype(jnp.float32)) + bias_E
        r = routing.softmax_topk(logits_TE, bound=k_max, norm_topk_prob=False, budget_T=budget_T)
        y_TD = moe.expert_compute(backend, x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD)
        return y_TD, r.expert_counts()

    return layer


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--slow", action="store_true",
                   help="also run ragged off TPU and pallas in interpret mode")
    p.add_argument("--skew", type=float, default=0.0,
                   help="router bias skew * N(0, 1) per expert: uneven loads, as trained routers have")
    p.add_argument("--growth", type=float, default=None,
                   help=f"bucketed capacity growth (default moe.BUCKET_GROWTH={moe.BUCKET_GROWTH})")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to run instead of those that run fast here")
    a = p.parse_args()
    dt = jnp.dtype(a.dtype)
    if a.growth:
        moe.BUCKET_GROWTH = a.growth
    rng = np.random.default_rng(0)
    t, d, f, e, k = a.tokens, a.d, a.f, a.experts, a.topk
    x = jnp.asarray(rng.normal(size=(t, d)), dt)
    router = jnp.asarray(rng.normal(size=(d, e)) / np.sqrt(d), dt)
    ws = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dt)
          for s in ((e, d, f), (e, d, f), (e, f, d))]
    bias = jnp.asarray(a.skew * rng.normal(size=e), jnp.float32)
    budgets = {
        f"top-{k}": jnp.full((t,), k, jnp.int32),
        "mean 4": jnp.asarray(rng.integers(1, 8, t), jnp.int32),
        "mean 2": jnp.asarray(rng.integers(1, 4, t), jnp.int32),
    }
    dev = jax.devices()[0]
    n = 2048
    matmul = dense_matmul(n, dt)
    print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); "
          f"jax {jax.__version__}; auto backend -> {moe.resolve_backend('auto')}")
    print(f"layer: T={t} D={d} F={f} E={e} k={k} {a.dtype}, router skew {a.skew}; "
          f"bucket growth {moe.BUCKET_GROWTH} "
          f"({len(moe.capacity_buckets(t * k, t, e))} buckets); reference: dense matmul {n}^3, "
          "timed in the same rounds as each backend")
    print(f"{'backend':9} {'budget':7} {'ms':>8} {'x top-k':>8} {'pairs':>7} {'experts':>7} "
          f"{'max/mean':>8} {'GFLOP/s':>8} {'matmul':>7} {'ratio':>6} {'1st call s':>10}")
    names = a.backends.split(",") if a.backends else available_backends(a.slow)
    for name in names:
        layer = make_layer(name, k, bias)
        fns = {label: (lambda b=b: layer(x, router, *ws, b)) for label, b in budgets.items()}
        fns["matmul"] = matmul
        times, first = timed(fns, a.repeats if name != "dense" else 2)
        mm = 2 * n ** 3 / times["matmul"] / 1e9
        base = times[f"top-{k}"]
        for label, budget in budgets.items():
            counts = np.asarray(layer(x, router, *ws, budget)[1])
            pairs = int(counts.sum())
            gflops = pairs * 6 * d * f / times[label] / 1e9
            print(f"{name:9} {label:7} {times[label] * 1e3:8.1f} {times[label] / base:8.2f} "
                  f"{pairs:7d} {int((counts > 0).sum()):7d} {counts.max() / counts.mean():8.2f} "
                  f"{gflops:8.1f} {mm:7.0f} "
                  f"{gflops / mm:6.2f} {first[label]:10.1f}")


if __name__ == "__main__":
    main()
