"""Fast decoding of bidirectional models: approximate K/V caches (and decoders) side by side.

Run: python benchmarks/decoding.py [--part speed|quality|both] [--prompt 512 --gen 256
                                    --block 32 --steps 64 --d 512 --layers 8 --experts 64
                                    --topk 8 --repeats 2 --n 400]

Speed: a random bidirectional OLMoE-family model (``jmoe.OlmoeConfig``, ``causal=False``:
LLaDA-MoE's attention; d=512, 8 layers, 64 experts top-8 by default), one prompt of
``--prompt`` random tokens, ``--gen`` generated in blocks of ``--block`` with LLaDA's fixed
schedule (``--steps`` calls over the generation). Each cache runs once to compile, then
``--repeats`` interleaved rounds; tokens/s counts generated tokens over the best round's
wall time. Agreement is the share
of generated tokens equal to the uncached run's (stale K/V change some).

Quality: the shipped default model (``jmoe.load()``) on ``--n`` held-out additions
(``jmoe.tasks``): exact-match accuracy and NFE (model calls of the batch's one loop) of
each cache and decoder against the uncached fixed schedule, at the model's generation
defaults (one block of 6) and with blocks of 2 (so prefix and dual differ).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import jmoe
from jmoe import tasks

# (name, generate kwargs) of the speed table; "uncached" first: the others compare to it
SPEED_RUNS = [
    ("uncached", dict(cache=False)),
    ("prefix", dict(cache="prefix")),
    ("dual", dict(cache="dual")),
    ("dual, cache_window=(16, 16)", dict(cache="dual", cache_window=(16, 16))),
]

# (name, generate kwargs) of the quality table; the first is the baseline.
QUALITY_RUNS = [
    ("uncached, fixed schedule", dict(cache=False)),
    ("prefix", dict(cache="prefix")),
    ("dual", dict(cache="dual")),
    ("dual, cache_refresh=2", dict(cache="dual", cache_refresh=2)),
    ("threshold 0.9, uncached", dict(cache=False, threshold=0.9)),
    ("threshold 0.9 + dual (dInfer's configuration)", dict(cache="dual", threshold=0.9)),
]
# Decoders (issue 15, second half: credit, hierarchy, LLaDA2.1 joint threshold, top-k /
# top-p): append their (name, generate kwargs) rows here, e.g.
#   QUALITY_RUNS.append(("credit decoder + dual", dict(cache="dual", decoder=...)))
DECODER_RUNS: list[tuple[str, dict]] = []


def speed_model(a):
    v = a.vocab
    config = jmoe.OlmoeConfig(
        vocab_size=v, hidden_size=a.d, num_layers=a.layers, num_heads=a.d // 64,
        num_kv_heads=a.d // 64, head_dim=64, moe_intermediate_size=a.d // 2,
        num_experts=a.experts, num_experts_per_tok=a.topk, causal=False,
        max_position_embeddings=a.prompt + a.gen, mask_token_id=v - 1, eos_token_id=v - 2,
        pad_token_id=v - 2)
    return jmoe.random_model(config, seed=0)


def timed(model, prompts, kw):
    out = jmoe.generate(model, prompts, **kw)  # compiles
    jax.block_until_ready(out.tokens)
    t = time.perf_counter()
    out = jmoe.generate(model, prompts, **kw)
    jax.block_until_ready(out.tokens)
    return out, time.perf_counter() - t


def interleaved(model, prompts, runs, repeats):
    """Each run once to compile, then ``repeats`` rounds of all runs in turn: the outputs
    and each run's best wall time (the machine is shared: a round measures all runs
    under about the same load)."""
    outs = {name: jmoe.generate(model, prompts, **kw) for name, kw in runs}
    best = {name: float("inf") for name, _ in runs}
    for r in range(repeats):
        for name, kw in runs:
            t = time.perf_counter()
            jax.block_until_ready(jmoe.generate(model, prompts, **kw).tokens)
            best[name] = min(best[name], time.perf_counter() - t)
            print(f"  round {r}: {name}: {time.perf_counter() - t:.2f} s", flush=True)
    return outs, best


def speed(a):
    model = speed_model(a)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, a.vocab - 2, (1, a.prompt)).astype(np.int32)
    common = dict(gen_length=a.gen, block_length=a.block, steps=a.steps, early_stop=False)
    outs, best = interleaved(model, prompt, [(n, dict(common, **kw)) for n, kw in SPEED_RUNS],
                             a.repeats)
    rows = [(n, np.asarray(outs[n].tokens)[:, -a.gen:], best[n], outs[n].nfe,
             outs[n].expert_work) for n, _ in SPEED_RUNS]
    base_tok, base_sec = rows[0][1], rows[0][2]
    print(f"\nspeed: random bidirectional OLMoE d={a.d}, {a.layers} layers, {a.experts} "
          f"experts top-{a.topk}, prompt {a.prompt}, gen {a.gen}, block {a.block}, "
          f"steps {a.steps}, batch 1, float32")
    print("| cache | tokens/s | vs uncached | NFE | expert work vs uncached | "
          "token agreement with uncached |")
    print("|---|---|---|---|---|---|")
    for name, tok, sec, nfe, work in rows:
        print(f"| {name} | {a.gen / sec:.1f} | {base_sec / sec:.2f}x | {nfe} | "
              f"{work / rows[0][4]:.2f} | {np.mean(tok == base_tok):.3f} |")


def quality(a):
    model = jmoe.load()
    x, y = tasks.addition_pairs(np.random.default_rng(a.seed), a.n, held_out=True)
    prompts, answers = tasks.addition_texts(x, y)
    for setting, extra in (("model defaults (gen 6, one block of 6, 6 steps)", {}),
                           ("blocks of 2 (gen 6, 6 steps)", dict(block_length=2))):
        print(f"\nquality: shipped default model, {a.n} held-out sums, {setting}")
        print("| run | held-out accuracy | vs baseline (points) | NFE | tokens/s |")
        print("|---|---|---|---|---|")
        base = None
        for name, kw in QUALITY_RUNS + DECODER_RUNS:
            out, sec = timed(model, prompts, dict(extra, **kw))
            acc = 100 * float(np.mean([t == w for t, w in zip(out.texts, answers)]))
            base = acc if base is None else base
            toks = len(prompts) * 6
            print(f"| {name} | {acc:.1f}% | {acc - base:+.1f} | {out.nfe} | "
                  f"{toks / sec:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("speed", "quality", "both"), default="both")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({platform.machine()}, "
          f"{os.cpu_count()} cpus)")
    if a.part in ("speed", "both"):
        speed(a)
    if a.part in ("quality", "both"):
        quality(a)


if __name__ == "__main__":
    main()
