"""LLaDA2 generation with and without the exact K/V cache of finished blocks.

Run: python benchmarks/llada2_cache.py [--prompt 512 --gen 64 --block 32 --steps 8
                                        --d 256 --layers 4 --experts 16 --topk 4
                                        --batch 1 --repeats 3]

A small random LLaDA2 config (``jmoe.LLaDA2Config``, a dense first layer, group-limited
sigmoid router, one shared expert) and one prompt of ``--prompt`` tokens, so the prefix
is long and the generation short. Both runs use LLaDA2's convention (aligned blocks,
block-causal attention, ``--steps`` per block); ``threshold=1.0`` never fires under the
strict rule, so both make exactly ``blocks x steps`` model calls. Uncached, each step
runs the model on the canvas up to the current block; cached, on the block only (plus
one call per finished block to store its keys/values, and one prefill of the prompt).
Timings are the best of ``--repeats`` interleaved rounds after a warm-up (compilation).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import jmoe


def make_model(args):
    config = jmoe.LLaDA2Config(
        vocab_size=args.vocab, hidden_size=args.d, num_layers=args.layers, num_heads=4,
        num_kv_heads=2, head_dim=args.d // 4, intermediate_size=2 * args.d,
        moe_intermediate_size=args.d // 2, num_experts=args.experts,
        num_experts_per_tok=args.topk, n_group=4, topk_group=2, num_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, rotary_fraction=0.5,
        max_position_embeddings=args.prompt + args.gen + args.block,
        mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2, pad_token_id=args.vocab - 2,
        moe_backend=args.backend)
    return jmoe.random_model(config, seed=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("prompt", 512), ("gen", 64), ("block", 32), ("steps", 8),
                          ("d", 256), ("layers", 4), ("experts", 16), ("topk", 4),
                          ("vocab", 1024), ("batch", 1), ("repeats", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--backend", default="dense")
    args = ap.parse_args(argv)
    model = make_model(args)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab - 2, (args.batch, args.prompt)).tolist()
    kw = dict(gen_length=args.gen, block_length=args.block, steps=args.steps, threshold=1.0,
              early_stop=False)
    runs = {"uncached": dict(cache=False), "cached": dict(cache=True)}
    outs, best = {}, {k: float("inf") for k in runs}
    for name, extra in runs.items():  # warm-up: compile
        outs[name] = generate_sync(model, prompts, **kw, **extra)
    for _ in range(args.repeats):
        for name, extra in runs.items():
            t0 = time.perf_counter()
            generate_sync(model, prompts, **kw, **extra)
            best[name] = min(best[name], time.perf_counter() - t0)
    same = np.array_equal(outs["cached"].tokens, outs["uncached"].tokens)
    n_tok = args.batch * args.gen
    print(f"device {jax.devices()[0].platform}, prefix {args.prompt}, gen {args.gen}, block "
          f"{args.block}, steps/block {args.steps}, batch {args.batch}, d {args.d}, layers "
          f"{args.layers}, experts {args.experts} top-{args.topk}, backend {args.backend}")
    print("| run | model calls | expert work | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    for name in runs:
        o = outs[name]
        print(f"| {name} | {o.nfe} | {o.expert_work} | {best[name]:.3f} | "
              f"{n_tok / best[name]:.1f} |")
    print(f"cached / uncached tokens/s: {best['uncached'] / best['cached']:.2f}x; "
          f"identical tokens: {same}")


def generate_sync(model, prompts, **kw):
    out = jmoe.generate(model, prompts, **kw)
    return out  # GenerateOutput holds host arrays: the run has finished


if __name__ == "__main__":
    main()
