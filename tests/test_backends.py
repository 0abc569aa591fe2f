"""Expert backends against a per-assignment reference written from the spec.

The spec: token t's MoE output is ``sum_a w_a * SwiGLU_{e_a}(x_t)`` over its live
assignments a (expert id < E). The NumPy oracle loops over assignments in
float64; the gradient reference is the same sum written per assignment in jnp
(gathered expert weights, no sorting, no buckets), differentiated by JAX.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jmoe import cpu_kernels, moe, routing

# cpu_gmm wherever its kernel builds (XLA:CPU and a C++ compiler; tests/test_cpu_kernels.py)
BACKENDS = ("dense", "bucketed", "ragged") + (
    ("cpu_gmm",) if jax.default_backend() == "cpu" and cpu_kernels.available() else ())


def silu(x):
    return x / (1.0 + np.exp(-x))


def oracle_moe(x, r, wg, wu, wd):
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    y = np.zeros_like(x)
    for t, e, w in zip(np.asarray(r.token_A), np.asarray(r.expert_A), np.asarray(r.weight_A)):
        if e < r.num_experts:
            h = silu(x[t] @ wg[e]) * (x[t] @ wu[e])
            y[t] += float(w) * (h @ wd[e])
    return y


def reference_moe(x, r, wg, wu, wd):
    """Per-assignment jnp form of the spec (differentiable reference)."""
    e = r.num_experts
    live = r.expert_A < e
    ex = jnp.minimum(r.expert_A, e - 1)
    xa = x[r.token_A]
    h = jax.nn.silu(jnp.einsum("AD,ADF->AF", xa, wg[ex])) * jnp.einsum("AD,ADF->AF", xa, wu[ex])
    ya = jnp.einsum("AF,AFD->AD", h, wd[ex]) * jnp.where(live, r.weight_A, 0.0)[:, None]
    return jax.ops.segment_sum(ya, r.token_A, num_segments=x.shape[0])


@jax.jit
def _run_all(x, r, wg, wu, wd):
    return {b: moe.expert_compute(b, x, r, wg, wu, wd) for b in BACKENDS}


def make_routing(kind, logits, k, budget=None, valid=None, batch=1, cf=1.0):
    if kind == "expert_choice":
        b = batch
        return routing.expert_choice(logits.reshape(b, -1, logits.shape[-1]), k=k,
                                     capacity_factor=cf,
                                     valid_BL=None if valid is None else valid.reshape(b, -1))
    return routing.softmax_topk(logits, bound=k, norm_topk_prob=False, budget_T=budget,
                                valid_T=valid)


def weights(rng, e, d, f):
    return [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
            for s in ((e, d, f), (e, d, f), (e, f, d))]


@st.composite
def backend_case(draw):
    t = 12  # few distinct shapes: each one is a compile of all three backends
    e = draw(st.sampled_from([4, 6]))
    k = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["token_choice", "masked", "expert_choice"]))
    shape = draw(st.sampled_from(["random", "empty_experts", "one_expert"]))
    return t, e, k, kind, shape, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(backend_case())
def test_backends_match_oracle(case):
    t, e, k, kind, shape, seed = case
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, e)).astype(np.float32)
    if shape == "empty_experts":
        logits[:, : e // 2] -= 1e4  # never in anyone's top-k (k <= e/2 here)
        k = min(k, e // 2)
    elif shape == "one_expert":
        logits[:, 0] += 50.0  # every token ranks expert 0 first
    valid = jnp.asarray(rng.random(t) < 0.8)
    budget = jnp.asarray(rng.integers(1, k + 1, t)) if kind == "masked" else None
    r = make_routing(kind, jnp.asarray(logits), k, budget, valid, batch=2)
    x = jnp.asarray(rng.normal(size=(t, 8)), jnp.float32)
    ws = weights(rng, e, 8, 4)
    want = oracle_moe(x, r, *ws)
    for name, y in _run_all(x, r, *ws).items():
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6, err_msg=name)


CASES = {
    "token_choice": dict(kind="token_choice", budget=False),
    "masked": dict(kind="token_choice", budget=True),
    "expert_choice": dict(kind="expert_choice", budget=False),
    "hot_expert": dict(kind="token_choice", budget=False, hot=True),  # bucketed overflow path
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_gradients_agree(case):
    rng = np.random.default_rng(7)
    t, e, d, f, k = 12, 6, 8, 4, 3
    t = 24 if CASES[case].get("hot") else t
    logits = jnp.asarray(rng.normal(size=(t, e)) + 30.0 * CASES[case].get("hot", 0) *
                         (np.arange(e) == 2), jnp.float32)
    valid = jnp.asarray(np.arange(t) % 5 != 0)
    budget = jnp.asarray(rng.integers(1, k + 1, t)) if CASES[case]["budget"] else None
    r = make_routing(CASES[case]["kind"], logits, k, budget, valid, batch=2)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ws = weights(rng, e, d, f)
    ct = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def loss(fn):
        return lambda x, *w: jnp.sum(fn(x, r, *w) * ct)

    want = jax.jit(jax.grad(loss(reference_moe), argnums=(0, 1, 2, 3)))(x, *ws)
    for name in BACKENDS:
        fn = lambda x, r, *w, name=name: moe.expert_compute(name, x, r, *w)
        got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3)))(x, *ws)
        for which, g, w in zip(("x", "w_gate", "w_up", "w_down"), got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} d/d{which}")


def test_capacity_buckets_cover_the_worst_case():
    b = moe.capacity_buckets(4096 * 8, 4096, 64)
    assert b[0] == 8 and b[-1] == 4096 and list(b) == sorted(set(b))
    assert all(c % 8 == 0 for c in b[:-1])
    assert all(n <= 1.5 * c + 8 for c, n in zip(b, b[1:]))  # padding waste about 1.5x at most
    assert moe.capacity_buckets(5, 5, 4) == (5,)
    assert moe.capacity_buckets(4096 * 8, 4096, 64, max_load=300)[-1] == 300


def plan_rows(counts, buckets, num_hot):
    """Rows the bucketed backend computes for these loads, checking nothing is dropped."""
    e = counts.shape[0]
    over = moe.overflow_buckets(buckets[-1] - buckets[0])
    i_base, i_over, hot = moe.capacity_plan(counts, buckets, over, num_hot)
    cap, cap_over = buckets[int(i_base)], over[int(i_over)]
    c = np.asarray(counts)
    cold = np.setdiff1d(np.arange(e), np.asarray(hot))
    assert np.all(c[cold] <= cap)  # experts without overflow fit the base buffer
    assert c.max() <= cap + cap_over  # the hottest expert fits base + overflow
    return e * cap + num_hot * cap_over


def test_bucket_falls_with_budgets_and_never_drops():
    rng = np.random.default_rng(0)
    t, e, k = 512, 16, 8
    logits = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)
    buckets = moe.capacity_buckets(t * k, t, e)
    rows = {}
    for mean_k in (8, 2, 1):
        budget = jnp.full((t,), mean_k)
        r = routing.softmax_topk(logits, bound=k, norm_topk_prob=False, budget_T=budget)
        rows[mean_k] = plan_rows(r.expert_counts(), buckets, 2)
    assert rows[1] < rows[2] < rows[8]
    # every token on one expert: its load T goes mostly to the overflow of 2 hot experts
    hot = logits.at[:, 3].add(100.0)
    r = routing.softmax_topk(hot, bound=1, norm_topk_prob=False)
    assert plan_rows(r.expert_counts(), buckets, 2) <= e * 8 + 2 * t


def test_expert_choice_bucket_bound():
    """Expert choice bounds every load by B*C, and the real load always fits."""
    rng = np.random.default_rng(1)
    b, l, e, k, cf = 3, 20, 8, 2, 1.5
    valid = jnp.asarray(rng.random((b, l)) < 0.7)
    r = routing.expert_choice(jnp.asarray(rng.normal(size=(b, l, e)), jnp.float32), k=k,
                              capacity_factor=cf, valid_BL=valid)
    c = min(l, math.ceil(cf * l * k / e))
    assert r.load_bound() == b * c
    buckets = moe.capacity_buckets(r.expert_A.shape[0], b * l, e, r.load_bound())
    assert buckets[-1] == b * c
    counts = r.expert_counts()
    assert buckets[int(moe.bucket_index(counts, buckets))] >= int(counts.max())
    plan_rows(counts, buckets, 1)


def test_auto_backend_is_the_target_platforms_choice(caplog):
    """``auto`` follows the platform the program targets, not the process's backend."""
    from jmoe import platform as platform_lib

    platform_lib._log_auto.cache_clear()
    cpu_choice = "cpu_gmm" if cpu_kernels.available() else "bucketed"
    want = {"tpu": "ragged", "gpu": "bucketed", "cpu": cpu_choice, None: "bucketed"}
    with caplog.at_level("INFO", logger="jmoe"):
        for platform, choice in want.items():
            assert moe.resolve_backend("auto", "float32", platform) == choice
    assert f"picked 'ragged' for platform 'tpu'" in caplog.text
    assert moe.resolve_backend("dense", platform="tpu") == "dense"
    with pytest.raises(ValueError, match="moe_backend='nope'"):
        moe.expert_compute("nope", None, None, None, None, None)
