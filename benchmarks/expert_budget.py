"""Expert budgets and block expert sets: accuracy vs routed work vs expert weights read.

Run: python benchmarks/expert_budget.py [--n 400] [--part shipped|shapes|all] [--reps 5]

1. ``shipped``: the shipped default model on ``--n`` held-out sums (``jmoe.tasks``, the
   digit-count mix its metrics.json scores): exact-match accuracy, routed work
   (``expert_work``, token-expert pairs) relative to fixed top-k, and the distinct
   experts per MoE layer per model call per sequence (``expert_reads / (nfe * n *
   n_moe)``: the experts whose weights a batch-1 step reads), for fixed k = 1..top-k,
   adaptive budgets (linear / exponential from 1 and 2; the update interval derived
   from the steps), the derived defaults (``AdaptiveExperts()``), linear budgets capped
   one below top-k, and block sets
   ``M`` in {E/8, E/4, 3E/8, E/2} under the ``mass``, ``first_step`` and ``topk_mass``
   rules (budgets: the defaults, or fixed top-k; capped at M); then the prefix cache
   (fixed top-k, the defaults) and M in {3E/8, E/2} with ``set_coverage=0.9`` and/or
   the prefix cache.
2. ``shapes``: random models shaped like LLaDA-MoE-7B (E=64, top-8, softmax) and
   LLaDA2-mini (E=256, top-8, 8 groups / top-4 groups, sigmoid, one shared expert),
   one MoE layer, on one 32-token block (a cached LLaDA2 block call, or one LLaDA-MoE
   block): distinct experts per layer, expert weight bytes read per layer and step at
   the real models' expert sizes (bfloat16), and the CPU time of the forward
   unrestricted vs with block sets, measured side by side in one run (the fastest of
   ``--reps`` interleaved calls) (bfloat16
   weights at reduced width so the experts do not fit in cache; cpu_gmm, which never
   touches an expert without rows, and bucketed, which runs on the gathered set).

Prints markdown tables (benchmarks/RESULTS.md, README.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmoe
from jmoe import tasks


def shipped(n: int, seed: int):
    model = jmoe.load()
    cfg = model.config
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    n_moe = cfg.num_layers - cfg.first_k_dense_replace
    a, b = tasks.addition_pairs(np.random.default_rng(seed), n, held_out=True)
    prompts, answers = tasks.addition_texts(a, b)
    A = jmoe.AdaptiveExperts
    runs = [(f"fixed k={kk}", A(initial=kk, maximum=kk)) for kk in range(1, k + 1)]
    runs += [(f"adaptive {g} from {i}", A(growth=g, initial=i))
             for g in ("linear", "exponential") for i in (1, 2)]
    runs += [("adaptive defaults", A())]
    runs += [(f"adaptive linear {i} to {k - 1}", A(initial=i, maximum=k - 1))
             for i in (1, 2) if k > 2]
    for rule in ("mass", "first_step", "topk_mass"):
        for m in sorted({max(1, e // 8), e // 4, 3 * e // 8, e // 2}):
            if m < k:  # the budgets must fit the set: top-k capped at M
                runs.append((f"sets {rule} M={m}, k={m}",
                             A(initial=m, maximum=m, experts_per_block=m, expert_set=rule)))
            else:
                runs.append((f"sets {rule} M={m}, defaults",
                             A(experts_per_block=m, expert_set=rule)))
                runs.append((f"sets {rule} M={m}, k={k}",
                             A(initial=k, maximum=k, experts_per_block=m, expert_set=rule)))
    runs = [(name, ad, {}) for name, ad in runs]
    # the prefix cache (Fast-dLLM) computes only the block after the first call, so a
    # step's tokens touch fewer experts; set_coverage keeps only the experts that cover
    # that share of the set's router mass (0.9 chosen among 0.8-0.95 on seeds 1234 and 99)
    prefix = {"cache": "prefix"}
    runs += [(f"fixed k={k}, prefix cache", A(initial=k, maximum=k), prefix),
             ("adaptive defaults, prefix cache", A(), prefix)]
    for m in sorted({3 * e // 8, e // 2}):
        if m >= k:
            runs += [(f"sets mass M={m}, defaults, coverage 0.9",
                      A(experts_per_block=m, set_coverage=0.9), {}),
                     (f"sets mass M={m}, defaults, prefix cache",
                      A(experts_per_block=m), prefix),
                     (f"sets mass M={m}, defaults, coverage 0.9, prefix cache",
                      A(experts_per_block=m, set_coverage=0.9), prefix)]
    rows = []
    for name, adaptive, kw in runs:
        out = jmoe.generate(model, prompts, adaptive=adaptive, **kw)
        acc = float(np.mean([t == w for t, w in zip(out.texts, answers)]))
        distinct = out.expert_reads / (out.nfe * n * n_moe)
        rows.append((name, acc, out.expert_work, distinct))
    base = dict((r[0], r) for r in rows)[f"fixed k={k}"]
    print(f"\n### Shipped model: {n} held-out sums (E={e}, top-{k}, {n_moe} MoE layers)\n")
    print(f"| run | held-out accuracy | routed work vs top-{k} | distinct experts / layer / "
          f"step | expert weight bytes vs top-{k} |")
    print("|---|---|---|---|---|")
    for name, acc, work, distinct in rows:
        print(f"| {name} | {acc:.3f} | {work / base[2]:.2f} | {distinct:.2f} | "
              f"{distinct / base[3]:.2f} |")
    return rows


def _time_interleaved(fns: list, reps: int) -> list[float]:
    """The fastest of ``reps`` timed calls of each fn, taken round-robin (one rep of each,
    then the next) so a busy shared machine slows every variant alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # compile
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t)
    return best


SHAPES = {
    # name: (config kwargs at reduced width, the real model's (hidden, expert ffn))
    "LLaDA-MoE-7B-shaped": (dict(family="olmoe", num_experts=64, num_experts_per_tok=8,
                                 hidden_size=512, moe_intermediate_size=512),
                            (2048, 1024)),
    "LLaDA2-mini-shaped": (dict(family="llada2", num_experts=256, num_experts_per_tok=8,
                                n_group=8, topk_group=4, num_shared_experts=1,
                                hidden_size=512, moe_intermediate_size=128),
                           (2048, 512)),
}


def shape_config(kw, backend):
    kw = dict(kw)
    family = kw.pop("family")
    common = dict(vocab_size=256, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=32,
                  dtype="bfloat16", moe_backend=backend, mask_token_id=255, eos_token_id=254,
                  pad_token_id=253, max_position_embeddings=64)
    if family == "olmoe":
        return jmoe.OlmoeConfig(**common, causal=False, **kw)
    return jmoe.LLaDA2Config(**common, first_k_dense_replace=0, intermediate_size=512,
                             **kw)


def shapes(reps: int, block: int = 32):
    print(f"\n### Random models, one MoE layer, one {block}-token block (batch 1)\n")
    print("| model | backend | M | distinct experts / layer | expert bytes / layer / step "
          "(real size, bf16) | bytes vs unrestricted | CPU time vs unrestricted |")
    print("|---|---|---|---|---|---|---|")
    tokens = np.random.default_rng(0).integers(0, 250, (1, block))
    for name, (kw, (d_real, f_real)) in SHAPES.items():
        per_expert = 3 * d_real * f_real * 2
        e = kw["num_experts"]
        for backend in ("cpu_gmm", "bucketed"):
            model = jmoe.random_model(shape_config(kw, backend), seed=0)
            ms = (None, e // 2, e // 4, e // 8)
            fns = [lambda m=m: jmoe.forward(model, tokens, experts_per_block=m)[0] for m in ms]
            times = _time_interleaved(fns, reps)
            for m, t in zip(ms, times):
                aux = jmoe.forward(model, tokens, experts_per_block=m)[1]
                d = float(np.asarray(aux["distinct_experts"]).mean())
                if m is None:
                    base_t, base_d = t, d
                print(f"| {name} | {backend} | {m or 'all'} | {d:.1f} | "
                      f"{d * per_expert / 2**20:.0f} MiB | {d / base_d:.2f} | "
                      f"{t / base_t:.2f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--part", choices=("shipped", "shapes", "all"), default="all")
    a = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"{jax.device_count()} device(s)")
    if a.part in ("shipped", "all"):
        shipped(a.n, a.seed)
    if a.part in ("shapes", "all"):
        shapes(a.reps)


if __name__ == "__main__":
    main()
