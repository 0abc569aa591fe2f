"""The shipped default model through lm-evaluation-harness on the local addition tasks
(``tests/eval_tasks``: 50 held-out sums, generated and exact-matched; the same sums as
a 4-way multiple choice scored by the Monte Carlo likelihood), under fixed top-k,
adaptive budgets and block expert sets, with the expert work and NFE lm_eval's results
report (``results["config"]["jmoe"]``).

Run: python benchmarks/eval_harness.py [--mc-num 32]
Generation runs one ``jmoe.generate`` call of all 50 prompts (batch 50), so NFE is that
call's model calls; expert work is routed token-expert pairs per item, relative to
fixed top-4 on the same task.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

from jmoe.eval.run import evaluate

LAYERS = 4  # the default model's MoE layers
TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                     "eval_tasks")

RUNS = [  # (name, model args, score the multiple choice too)
    ("fixed k=4 (the model's top-k)", {}, True),
    ("fixed k=2", {"experts_per_token": 2}, True),
    ("fixed k=1", {"experts_per_token": 1}, True),
    ("adaptive, defaults (linear 2 to 4)", {"adaptive": "linear"}, False),
    ("adaptive linear 1 to 4, every call", {"adaptive": "linear", "adaptive_initial": 1,
                                            "update_interval": 1}, False),
    ("block sets mass M=8, top-4", {"experts_per_block": 8, "experts_per_token": 4}, True),
    ("block sets mass M=6, top-4", {"experts_per_block": 6, "experts_per_token": 4}, True),
    ("block sets mass M=4, top-4", {"experts_per_block": 4, "experts_per_token": 4}, True),
    ("block sets first_step M=6, top-4", {"experts_per_block": 6, "expert_set": "first_step",
                                          "experts_per_token": 4}, False),
    ("adaptive defaults + sets mass M=6", {"adaptive": "linear", "experts_per_block": 6},
     False),
    ("threshold 0.9", {"threshold": 0.9}, False),
]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mc-num", type=int, default=32)
    a = p.parse_args()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=TASKS, include_defaults=False)
    rows, base = [], None
    for name, args, mc in RUNS:
        tasks = ["jmoe_addition"] + (["jmoe_addition_mc"] if mc else [])
        res = evaluate(tasks, task_manager=tm, batch_size=64,
                       model_args=dict(args, mc_num=a.mc_num, mc_batch_size=a.mc_num),
                       verbosity="ERROR")
        info, r = res["config"]["jmoe"], res["results"]
        work = info["generate_expert_work"] / info["generate_rows"]
        base = base or work
        steps = info["generate_rows"] * info["generate_nfe"] * LAYERS
        reads = info["generate_expert_reads"] / steps
        ll = (f"{r['jmoe_addition_mc']['acc,none']:.2f} / "
              f"{info['loglikelihood_expert_work'] / 200 / a.mc_num:.0f}" if mc else "-")
        rows.append(f"| {name} | {r['jmoe_addition']['exact_match,none']:.2f} | "
                    f"{info['generate_nfe']} | {work:.0f} ({work / base:.2f}) | {reads:.2f} | "
                    f"{ll} |")
    print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].platform}; "
          f"mc_num {a.mc_num}")
    print("| run | exact match (50 sums) | NFE | expert work / item (vs top-4) | "
          "distinct experts / layer / step | multiple choice acc / expert work per draw |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
