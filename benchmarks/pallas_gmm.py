"""Kernel-level timing of the Pallas grouped-matmul MoE experts (``moe_backend="pallas"``).

One MoE expert layer (routing given) at fixed top-k vs smaller mean budgets, for the
Pallas kernel on this platform and the XLA ragged_dot reference on the same layout.
Reports live tiles (the work the kernel actually does), time, time ratio against the
full top-k, and GFLOP/s on routed work against a plain dense matmul on this device.

On CPU the kernel runs in Pallas interpret mode: the numbers show that dead tiles
are skipped (time falls with the budget), not kernel speed. Run unchanged on a GPU
or TPU for real numbers (defaults there: OLMoE-like E=64, k=8, D=2048, F=1024).

  python benchmarks/pallas_gmm.py                 # small shapes on CPU
  python benchmarks/pallas_gmm.py --tokens 4096   # on an accelerator
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import routing as routing_lib
from pallas_kernels.moe_gmm import api, make_layout


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _dense_gflops(t, d, f, dtype, repeats):
    k = jax.random.split(jax.random.key(1), 2)
    x, w = jax.random.normal(k[0], (t, d), dtype), jax.random.normal(k[1], (d, f), dtype)
    mm = jax.jit(lambda x, w: x @ w)
    return 2 * t * d * f / _time(mm, x, w, repeats=repeats) / 1e9


def main(argv=None):
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256 if on_cpu else 4096)
    p.add_argument("--d", type=int, default=64 if on_cpu else 2048)
    p.add_argument("--f", type=int, default=32 if on_cpu else 1024)
    p.add_argument("--experts", type=int, default=16 if on_cpu else 64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tm", type=int, default=None, help="row tile (default: per lowering)")
    a = p.parse_args(argv)
    t, d, f, e, k, dtype = a.tokens, a.d, a.f, a.experts, a.topk, jnp.dtype(a.dtype)
    lowering, interpret = api.pick_lowering()
    blocks = api.BlockSizes.for_lowering(lowering, interpret)
    if a.tm:
        blocks = api.BlockSizes(tm=a.tm, tn=blocks.tn, tk=blocks.tk)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); lowering="
          f"{lowering}{' (interpret mode: not kernel speed)' if interpret else ''}; {blocks}")
    print(f"T={t} D={d} F={f} E={e} top-{k} {dtype.name}")

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d), dtype)
    ws = [0.05 * jax.random.normal(kk, s, dtype)
          for kk, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)])]
    logits = jax.random.normal(keys[4], (t, e), jnp.float32)
    rng = np.random.default_rng(0)
    budgets = {f"top-{k}": np.full(t, k), "mean 4": rng.integers(1, 8, t),
               "mean 2": rng.integers(1, 4, t)}
    dense = _dense_gflops(t * k, d, f, dtype, a.repeats)
    print(f"dense matmul [{t * k}x{d}]@[{d}x{f}]: {dense:.1f} GFLOP/s")
    print(f"{'backend':8} {'budget':8} {'live tiles':>11} {'ms':>9} {'ratio':>6} {'GFLOP/s':>8}")
    for backend in ("pallas", "xla"):
        base = None
        for name, budget in budgets.items():
            r = routing_lib.softmax_topk(logits, bound=k, norm_topk_prob=True,
                                         budget_T=jnp.asarray(np.minimum(budget, k)))
            lay = make_layout(r.token_A, r.expert_A, num_experts=e, num_tokens=t, tm=blocks.tm)
            fn = jax.jit(lambda x, *w, r=r: api.moe_experts(
                x, r, *w, backend=backend, lowering=lowering, interpret=interpret, blocks=blocks))
            sec = _time(fn, x, *ws, repeats=a.repeats)
            base = base or sec
            pairs = int(r.live_A.sum())
            gflops = 6 * pairs * d * f / sec / 1e9
            print(f"{backend:8} {name:8} {int(lay.num_live_tiles[0]):>5}/{lay.num_tiles:<5} "
                  f"{sec * 1e3:9.2f} {sec / base:6.2f} {gflops:8.1f}")


if __name__ == "__main__":
    main()
