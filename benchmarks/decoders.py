"""Decoders side by side on the shipped default model (issue 15): held-out accuracy,
model calls (NFE) and tokens/s, all measured in this one run.

Run: python benchmarks/decoders.py [--n 400] [--per-prompt 100]

Every row generates the same held-out sums (``jmoe.tasks``) with the model's own
generation settings (llada convention, uncached: the default model is bidirectional)
and greedy sampling; only the decoder differs. The baseline is LLaDA's fixed schedule.
Columns: accuracy on all prompts in one batch (and its difference to the fixed
schedule, in points); NFE of that batched run (a step runs until every row's block
is done); mean NFE of the first ``--per-prompt`` prompts generated one at a time (the
per-sequence count the papers report); tokens/s of the batched run (generated
positions / wall time, best of ``--repeat`` after a compile run) and its ratio to the
fixed schedule.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import jmoe
from jmoe import tasks

RUNS = [
    ("fixed schedule (baseline)", dict(decoder="fixed")),
    ("threshold 0.9", dict(decoder="threshold", threshold=0.9)),
    ("threshold 0.99", dict(decoder="threshold", threshold=0.99)),
    ("credit (0.9; alpha 0.7, boost 0.2, decay 0.8)", dict(decoder="credit")),
    ("credit 0.99", dict(decoder="credit", threshold=0.99)),
    ("hierarchy (low 0.4)", dict(decoder="hierarchy")),
    ("hierarchy (low 0.4, threshold 0.9)", dict(decoder="hierarchy", threshold=0.9)),
    ("joint Q (0.7 / edit 0.5)", dict(decoder="joint")),
    ("joint S (0.5 / edit 0.0)", dict(decoder="joint", threshold=0.5, edit_threshold=0.0)),
    ("joint, no edits (0.7 / edit 1.0)", dict(decoder="joint", edit_threshold=1.0)),
]


def _timed(model, prompts, kw, repeat):
    out = jmoe.generate(model, prompts, **kw)  # compile
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = jmoe.generate(model, prompts, **kw)
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--per-prompt", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    model = jmoe.load()
    x, y = tasks.addition_pairs(np.random.default_rng(a.seed), a.n, held_out=True)
    prompts, answers = tasks.addition_texts(x, y)
    g = model.config.generation["gen_length"]
    rows = []
    for name, kw in RUNS:
        out, wall = _timed(model, prompts, kw, a.repeat)
        acc = float(np.mean([t == w for t, w in zip(out.texts, answers)]))
        nfes = [jmoe.generate(model, [q], **kw).nfe for q in prompts[:a.per_prompt]]
        rows.append((name, acc, out.nfe, float(np.mean(nfes)), len(prompts) * g / wall))
    base = rows[0]
    print(f"device: {jax.devices()[0].device_kind} ({platform.machine()}); {a.n} held-out "
          f"sums, gen_length {g}, batch {a.n}; per-prompt NFE over {a.per_prompt}")
    print("| decoder | held-out accuracy | vs fixed (points) | NFE (batch) | NFE per prompt "
          "| tokens/s | vs fixed |")
    print("|---|---|---|---|---|---|---|")
    for name, acc, nfe, nfe1, tps in rows:
        print(f"| {name} | {acc:.3f} | {100 * (acc - base[1]):+.1f} | {nfe} | {nfe1:.2f} "
              f"| {tps:.0f} | {tps / base[4]:.2f}x |")


if __name__ == "__main__":
    main()
