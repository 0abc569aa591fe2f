"""Accuracy vs expert compute of the shipped default model on held-out additions.

Run: python benchmarks/default_model_compute.py [--n 400]
Fixed budgets k = 1..top-k (``AdaptiveExperts(initial=k, maximum=k)``), and adaptive
budgets (linear / exponential growth from initial 1 and 2 up to top-k, growing every
model call); expert_work is relative to fixed top-k on the same prompts.
"""

from __future__ import annotations

import argparse
import platform

import jax
import numpy as np

import jmoe
from jmoe import tasks


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    model = jmoe.load()
    k = model.config.num_experts_per_tok
    x, y = tasks.addition_pairs(np.random.default_rng(a.seed), a.n, held_out=True)
    prompts, answers = tasks.addition_texts(x, y)
    runs = [(f"fixed k={kk}", jmoe.AdaptiveExperts(initial=kk, maximum=kk)) for kk in range(1, k + 1)]
    runs += [(f"{g} from {i}", jmoe.AdaptiveExperts(growth=g, initial=i, maximum=k,
                                                    update_interval=1))
             for g in ("linear", "exponential") for i in (1, 2)]
    results = []
    for name, adaptive in runs:
        out = jmoe.generate(model, prompts, adaptive=adaptive)
        acc = float(np.mean([t == w for t, w in zip(out.texts, answers)]))
        results.append((name, acc, out.expert_work))
    base = dict((n, w) for n, _, w in results)[f"fixed k={k}"]
    print(f"device: {jax.devices()[0].device_kind} ({platform.machine()}); {a.n} held-out sums")
    print(f"| budgets | held-out accuracy | expert_work vs fixed top-{k} |")
    print("|---|---|---|")
    for name, acc, work in results:
        print(f"| {name} | {acc:.3f} | {work / base:.2f} |")


if __name__ == "__main__":
    main()
