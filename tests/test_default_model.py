"""The shipped default model: offline load, its own generation defaults, and a held-out
accuracy floor measured when it was trained (jmoe/default_model/README.md)."""

import json
import os

import jmoe
from jmoe import tasks
from jmoe.checkpoint import DEFAULT_MODEL_DIR


def test_default_model_adds_with_no_options():
    model = jmoe.load()
    assert model.tokenizer is not None and model.config.mask_token_id is not None
    assert jmoe.generate(model, ["123+456="]).texts == ["579"]


def test_held_out_accuracy_floor():
    with open(os.path.join(DEFAULT_MODEL_DIR, "metrics.json")) as f:
        floor = json.load(f)["held_out_accuracy"]
    acc = tasks.addition_accuracy(jmoe.load(), n=200, seed=1234)
    assert acc >= floor, f"held-out accuracy {acc:.3f} fell below the trained floor {floor:.3f}"


def test_uniform_held_out_accuracy_floor():
    """Any two numbers of up to 3 digits: operands uniform in [0, 999] (mostly 3-digit
    sums with carries), held-out pairs only; at least 0.97 (issue 16's target; trained
    to 1.0 on these 400, metrics.json), so another CPU's rounding cannot flip it."""
    with open(os.path.join(DEFAULT_MODEL_DIR, "metrics.json")) as f:
        m = json.load(f)
    acc = tasks.addition_accuracy(jmoe.load(), n=m["uniform_n"], seed=m["uniform_seed"],
                                  distribution="uniform")
    assert acc >= 0.97, f"uniform held-out accuracy {acc:.3f} < 0.97"


def test_shipped_model_is_small():
    size = sum(os.path.getsize(os.path.join(d, f))
               for d, _, files in os.walk(DEFAULT_MODEL_DIR) for f in files)
    assert size < 20 * 2 ** 20


def test_adaptive_defaults_never_cost_accuracy():
    """``AdaptiveExperts()`` derives its budgets from the model (maximum = top-k, initial
    half of it, the interval from the steps): on the same held-out sums it is at least
    as accurate as fixed top-k, for less routed work."""
    import numpy as np

    model = jmoe.load()
    a, b = tasks.addition_pairs(np.random.default_rng(1234), 200, held_out=True)
    prompts, answers = tasks.addition_texts(a, b)
    fixed = jmoe.generate(model, prompts)
    adaptive = jmoe.generate(model, prompts, adaptive=jmoe.AdaptiveExperts())
    acc = lambda out: np.mean([t == w for t, w in zip(out.texts, answers)])  # noqa: E731
    assert acc(adaptive) >= acc(fixed), (acc(adaptive), acc(fixed))
    assert adaptive.expert_work < fixed.expert_work
