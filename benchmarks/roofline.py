"""A denoising step of the real models, compiled for TPU and GPU slices on this machine,
against a floor program costed the same way (XLA's cost model; no device, no times).

Run: JAX_PLATFORMS=cpu python benchmarks/roofline.py [--models llada-moe-7b,llada2-mini,
     olmoe-1b-7b] [--targets v5e-8,h100-8] [--backends pallas,ragged] [--batches 1,32]
     [--prompt 256 --gen 256 --block 32] [--json out.json]

For each model, target, backend and batch it plans the ``step`` program with
``jmoe.aot.plan`` (a cached block step for block-causal models, LLaDA2 here; the whole
canvas for the bidirectional ones) and the *floor*: the same step with
``moe_backend="dense"``, which reads every expert weight exactly once and does no
routing gathers, sorts or scatters (its FLOPs are E/k times the routed work, which
does not matter at these memory-bound sizes). Printed per device: the cost model's
bytes accessed and FLOPs of both, their ratio, the parameter bytes, and the roofline
``max(bytes / HBM bandwidth, flops / peak)`` in milliseconds.

Read these as cost-model figures only. XLA's TPU cost model is not HBM traffic (a lone
bf16 matmul on v5e reports 2-5x its operand bytes, JAX_NOTES), and a Pallas kernel is a
custom call, for which the cost model counts no bytes and no FLOPs: the ``pallas`` rows
therefore count everything *but* the expert kernels, and their ratio to the floor is a
lower bound, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for devices this machine lacks


_FLOORS: dict = {}


def row(model, target, backend, batch, args):
    from jmoe import aot

    kw = dict(target=target, batch=batch, prompt_length=args.prompt, gen_length=args.gen,
              block_length=args.block, programs=("step",))
    t0 = time.time()
    ours = aot.plan(model, moe_backend=backend, **kw).programs["step"]
    key = (model, target, batch)  # one floor serves every backend
    if key not in _FLOORS:
        _FLOORS[key] = aot.plan(model, moe_backend="dense", **kw).programs["step"]
    floor = _FLOORS[key]
    return {"model": model, "target": target, "backend": backend, "batch": batch,
            "param_GB": ours.param_bytes / 1e9, "GB": ours.bytes_accessed / 1e9,
            "floor_GB": floor.bytes_accessed / 1e9,
            "bytes_ratio": ours.bytes_accessed / max(floor.bytes_accessed, 1.0),
            "GFLOP": ours.flops / 1e9, "floor_GFLOP": floor.flops / 1e9,
            "roofline_ms": ours.roofline_s * 1e3, "floor_roofline_ms": floor.roofline_s * 1e3,
            "a2a_MB": ours.all_to_all_bytes / 1e6, "fits": ours.fits,
            "compile_s": time.time() - t0}


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
    args = p.parse_args()
    rows = []
    cols = ("model", "target", "backend", "batch", "param_GB", "GB", "floor_GB", "bytes_ratio",
            "GFLOP", "roofline_ms", "floor_roofline_ms", "a2a_MB", "fits")
    print(f"step of prompt {args.prompt} + gen {args.gen}, block {args.block}; per device; "
          "XLA cost-model figures (pallas rows exclude the kernels' own bytes)")
    print(" | ".join(cols))
    for model in args.models.split(","):
        for target in args.targets.split(","):
            for backend in args.backends.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    r = row(model, target, backend, batch, args)
                    rows.append(r)
                    print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                     for c in cols), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
