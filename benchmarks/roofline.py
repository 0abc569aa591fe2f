"""A denoising step of the real models, compiled for TPU and GPU slices on this machine,
against floors: two bytes models, no device, no times.

Run: JAX_PLATFORMS=cpu python benchmarks/roofline.py [--models llada-moe-7b,llada2-mini,
     olmoe-1b-7b] [--targets v5e-8,h100-8] [--backends pallas,ragged] [--batches 1,32]
     [--prompt 256 --gen 256 --block 32] [--explain] [--json out.json]

For each model, target, backend and batch it compiles the ``step`` program of
``jmoe.aot`` (a cached block step for block-causal models, LLaDA2 here; the whole canvas
for the bidirectional ones), per device, on a ``data=1 x expert=N`` mesh:

(a) ``a_GB``: ``jmoe.hlo_bytes`` on the optimized HLO: each top-level op's operands and
    results once, gathers counting only the rows they read, on-chip (VMEM) buffers
    counted at the DMA that fills them, and jmoe's Pallas kernel by the live tiles of its
    grid (``pallas_kernels.moe_gmm.traffic``). Floor ``a_floor_GB``: every dense weight
    once, the routed weights of only the experts the step's tokens touch, the embedding
    rows, the K/V cache read and written, the float32 logits and the residual stream.
    Both use one routing: each token picks ``k`` distinct experts uniformly (fixed seed);
    ``experts_touched`` is how many of the device's local experts that touches.
(b) ``GB``: XLA's cost model (``bytes accessed``; GPU: the CPU client's HLO cost
    analysis) against the same step with ``moe_backend="dense"`` costed the same way,
    which reads every expert weight exactly once with no routing gathers, sorts or
    scatters. The cost model counts nothing for a custom call, so the ``pallas`` rows
    of (b) leave out the kernels' bytes: a lower bound, not a measurement.

``--explain`` prints where (a)'s bytes go, by JAX scope. These are model figures, not
times: ``a_roofline_ms`` is (a)'s bytes over the chip's HBM bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for devices this machine lacks


_FLOORS: dict = {}


def representative_counts(config, tokens: int, expert: int, seed: int = 0) -> np.ndarray:
    """Rows per expert of device 0's ``E / expert`` experts when each of ``tokens`` tokens
    picks ``k`` distinct experts uniformly at random (fixed seed): the routing both the
    kernel model and the floor of measure (a) assume."""
    rng = np.random.default_rng(seed)
    e, k = config.num_experts, config.num_experts_per_tok
    picks = np.argsort(rng.random((tokens, e)), axis=1)[:, :k]
    return np.bincount(picks.ravel(), minlength=e)[: e // expert]


def kernel_model(counts, lowering: str):
    """``hlo_bytes.program_bytes``'s ``kernel_bytes`` for jmoe's Pallas grouped matmul."""
    from jmoe.hlo_bytes import ITEMSIZE
    from pallas_kernels.moe_gmm.kernel import BlockSizes, _fit, tpu_column_tile
    from pallas_kernels.moe_gmm.traffic import gmm_bytes

    def bytes_of(op, operands):
        if "moe_gmm" not in op.op_name:
            return None
        arrays = [a for arr in operands for a in arr]
        te = arrays[0]
        lhs = [a for a in arrays[2:] if len(a.dims) == 2]
        rhs = [a for a in arrays[2:] if len(a.dims) == 3]
        if not lhs or not rhs:
            return None  # the backward's tgmm does not run in a step
        m, kdim = lhs[0].dims
        tm = m // te.dims[0]
        n = rhs[0].dims[2] if rhs[0].dims[1] == kdim else rhs[0].dims[1]
        tn = BlockSizes.for_lowering(lowering, False).tn
        if lowering == "tpu":
            tn = min(tn, tpu_column_tile(kdim, len(rhs), int(ITEMSIZE[rhs[0].dtype])))
        tn = _fit(tn, n)
        return gmm_bytes(counts, lowering=lowering, tm=tm, tn=tn, k=kdim, n=n,
                         n_rhs=len(rhs), n_out=len(op.shape), n_lhs=len(lhs),
                         itemsize=ITEMSIZE[lhs[0].dtype], lhs_on_chip=lhs[0].on_chip,
                         rhs_on_chip=rhs[0].on_chip)
    return bytes_of


def floor_a(t, counts, *, batch: int, call_length: int, cached: bool, cache_length: int):
    """Measure (a)'s floor, per device: every dense weight read once, the routed experts'
    weights only for the experts ``counts`` touches, the embedding rows looked up, the
    K/V cache read (cached steps), the new K/V written, the float32 logits written and
    each layer's residual stream read and written twice (attention, MLP)."""
    import jax
    from jmoe.model import abstract_params

    c = t.config
    tokens = batch * call_length
    touched = int(np.count_nonzero(counts))
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            abstract_params(c, as_struct=True))[0]:
        keys = [getattr(k, "key", str(k)) for k in path]
        nbytes = leaf.size * leaf.dtype.itemsize
        if "moe" in keys and keys[-1] in ("w_gate", "w_up", "w_down") and leaf.ndim == 3:
            total += nbytes / c.num_experts * touched
        elif keys[:1] == ["embed"]:
            total += tokens * leaf.shape[1] * leaf.dtype.itemsize
        else:
            total += nbytes
    item = np.dtype(c.dtype).itemsize
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item
    total += batch * (cache_length if cached else 0) * kv + tokens * kv
    total += tokens * c.vocab_size * 4
    total += 4 * c.num_layers * tokens * c.hidden_size * item
    return total


def row(model, target, backend, batch, args):
    from jmoe import aot, hlo_bytes

    kw = dict(target=target, batch=batch, prompt_length=args.prompt, gen_length=args.gen,
              block_length=args.block, programs=("step",))
    t0 = time.time()
    t = aot.targeted(model, moe_backend=backend, **kw)
    lowered, call_length = t.lowered["step"]
    with aot.without_persistent_cache():
        compiled = lowered.compile()
    ours = aot.analyse(compiled, hw=t.hardware, devices=len(t.devices),
                       param_bytes=t.param_bytes, a2a=0)
    key = (model, target, batch)  # one floor serves every backend
    if key not in _FLOORS:
        _FLOORS[key] = aot.plan(model, moe_backend="dense", **kw).programs["step"]
    floor = _FLOORS[key]
    cached = call_length == args.block  # the step is a cached block call
    counts = representative_counts(t.config, batch * call_length, t.expert)
    a_bytes, ops = hlo_bytes.program_bytes(compiled.as_text(),
                                           kernel_bytes=kernel_model(counts, t.hardware.platform))
    a_floor = floor_a(t, counts, batch=batch, call_length=call_length, cached=cached,
                      cache_length=args.prompt + args.gen)
    return {"model": model, "target": target, "backend": backend, "batch": batch,
            "param_GB": ours.param_bytes / 1e9,
            "a_GB": a_bytes / 1e9, "a_floor_GB": a_floor / 1e9, "a_ratio": a_bytes / a_floor,
            "experts_touched": int(np.count_nonzero(counts)), "experts_local": int(counts.size),
            "GB": ours.bytes_accessed / 1e9, "floor_GB": floor.bytes_accessed / 1e9,
            "bytes_ratio": ours.bytes_accessed / max(floor.bytes_accessed, 1.0),
            "GFLOP": ours.flops / 1e9, "floor_GFLOP": floor.flops / 1e9,
            "roofline_ms": ours.roofline_s * 1e3, "floor_roofline_ms": floor.roofline_s * 1e3,
            "a_roofline_ms": a_bytes / (t.hardware.hbm_bw_per_chip * t.hardware.chips
                                        / len(t.devices)) * 1e3,
            "fits": ours.fits, "compile_s": time.time() - t0,
            "top_scopes": {k: v / 1e9 for k, v in
                           list(hlo_bytes.by_scope(ops, args.depth).items())[:args.top]}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llada-moe-7b,llada2-mini,olmoe-1b-7b")
    p.add_argument("--targets", default="v5e-8,h100-8")
    p.add_argument("--backends", default="pallas,ragged")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--explain", action="store_true",
                   help="print, per row, where measure (a)'s bytes go (by JAX scope)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    rows = []
    cols = ("model", "target", "backend", "batch", "param_GB", "experts_touched", "a_GB",
            "a_floor_GB", "a_ratio", "GB", "floor_GB", "bytes_ratio", "GFLOP", "a_roofline_ms",
            "fits")
    print(f"step of prompt {args.prompt} + gen {args.gen}, block {args.block}; per device. "
          "(a): jmoe.hlo_bytes model of the compiled HLO vs touched weights + K/V + "
          "activations; (b): XLA cost model vs the dense floor program (pallas rows: the "
          "kernels count nothing there)")
    print(" | ".join(cols))
    for model in args.models.split(","):
        for target in args.targets.split(","):
            for backend in args.backends.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    r = row(model, target, backend, batch, args)
                    rows.append(r)
                    print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                     for c in cols), flush=True)
                    if args.explain:
                        for k, v in r["top_scopes"].items():
                            print(f"      {v:8.3f} GB  {k}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
