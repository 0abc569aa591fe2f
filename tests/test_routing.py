"""Routers against NumPy oracles written from the spec (issue 3, SEEDS.md §1, §5).

Token choice: token t keeps the k_t highest-ranked experts of its softmax (ties to
the lower expert id); weights are the probabilities, renormalised over the kept
set when norm_topk_prob. Expert choice: within sequence b of real length L_b,
expert e picks its C_b = min(L_b, ceil(cf * L_b * k / E)) most probable real
tokens (ties to the earlier position), weight = the softmax probability.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jmoe
from jmoe import routing

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
# one compiled call per drawn shape is much cheaper than op-by-op dispatch
topk_jit = jax.jit(routing.softmax_topk, static_argnames=("bound", "norm_topk_prob"))
expert_choice_jit = jax.jit(routing.expert_choice, static_argnames=("k", "capacity_factor"))


def softmax64(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def oracle_token_choice(logits_TE, budget_T, valid_T, norm):
    """{token: {expert: weight}} for valid tokens."""
    x = np.asarray(logits_TE, np.float64)
    p = softmax64(x)
    out = {}
    for t in range(x.shape[0]):
        if not valid_T[t]:
            continue
        kept = np.argsort(-x[t], kind="stable")[:budget_T[t]]
        w = p[t, kept] / (p[t, kept].sum() if norm else 1.0)
        out[t] = dict(zip(kept.tolist(), w.tolist()))
    return out


def oracle_expert_choice(logits_BLE, valid_BL, k, cf):
    """({(b, e): [positions, best first]}, {(b, e, pos): weight}) from the spec."""
    x = np.asarray(logits_BLE, np.float64)
    b, l, e = x.shape
    p = softmax64(x)
    picks, weights = {}, {}
    for i in range(b):
        n = int(valid_BL[i].sum())
        cap = min(n, math.ceil(cf * n * k / e))
        real = np.flatnonzero(valid_BL[i])
        for j in range(e):
            order = real[np.argsort(-p[i, real, j], kind="stable")][:cap]
            picks[(i, j)] = order.tolist()
            for pos in order:
                weights[(i, j, int(pos))] = p[i, pos, j]
    return picks, weights


def routed_dict(r):
    """{token: {expert: weight}} of the live assignments of a Routing."""
    out = {}
    for t, e, w in zip(np.asarray(r.token_A), np.asarray(r.expert_A), np.asarray(r.weight_A)):
        if e < r.num_experts:
            assert e not in out.setdefault(int(t), {}), "a token met an expert twice"
            out[int(t)][int(e)] = float(w)
    return out


@st.composite
def token_choice_case(draw):
    t = draw(st.sampled_from([1, 5, 12]))
    e = draw(st.sampled_from([1, 4, 9]))
    k_max = draw(st.integers(1, e))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    budget = rng.integers(1, k_max + 1, t)
    valid = rng.random(t) < 0.8
    logits = rng.normal(size=(t, e)).astype(np.float32) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    return logits, budget, valid, k_max, draw(st.booleans())


@SETTINGS
@given(token_choice_case())
def test_masked_topk_matches_oracle(case):
    logits, budget, valid, k_max, norm = case
    r = topk_jit(jnp.asarray(logits), bound=k_max, norm_topk_prob=norm,
                 budget_T=jnp.asarray(budget), valid_T=jnp.asarray(valid))
    got, want = routed_dict(r), oracle_token_choice(logits, budget, valid, norm)
    assert set(got) == set(want)  # padding tokens get nothing
    for t in want:
        assert len(got[t]) == budget[t]  # exactly k_t distinct experts
        assert set(got[t]) == set(want[t])
        np.testing.assert_allclose([got[t][e] for e in want[t]], list(want[t].values()),
                                   rtol=2e-6, atol=1e-7)
    w = np.asarray(r.weight_A)[np.asarray(r.expert_A) == logits.shape[1]]
    assert np.all(w == 0)  # dropped slots carry no weight


def test_full_budget_is_bit_identical_to_plain_topk():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
    for norm in (False, True):
        plain = routing.softmax_topk(logits, bound=3, norm_topk_prob=norm)
        masked = routing.softmax_topk(logits, bound=3, norm_topk_prob=norm,
                                      budget_T=jnp.full((10,), 3, jnp.int32))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(masked)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_token_choice_ties_go_to_lower_expert_id():
    logits = jnp.zeros((2, 6), jnp.float32)
    r = routing.softmax_topk(logits, bound=3, norm_topk_prob=False,
                             budget_T=jnp.array([2, 3]))
    ids = np.asarray(r.expert_A).reshape(2, 3)
    assert ids.tolist() == [[0, 1, 6], [0, 1, 2]]


@pytest.mark.parametrize("bad", [0, 4, -1])
def test_out_of_range_budget_is_a_clear_error(bad):
    logits = jnp.zeros((3, 6), jnp.float32)
    budget = np.array([1, bad, 2])
    with pytest.raises(ValueError, match=f"value {bad} is outside the allowed range 1..3"):
        routing.softmax_topk(logits, bound=3, norm_topk_prob=False, budget_T=budget)


def test_non_integer_budget_and_bad_k_max_are_errors():
    logits = jnp.zeros((3, 6), jnp.float32)
    with pytest.raises(ValueError, match="must be integers"):
        routing.softmax_topk(logits, bound=3, norm_topk_prob=False, budget_T=np.ones(3) * 1.5)
    with pytest.raises(ValueError, match="bound=7"):
        routing.softmax_topk(logits, bound=7, norm_topk_prob=False)


def test_budgets_are_clipped_inside_jit():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    f = jax.jit(lambda x, b: routing.softmax_topk(x, bound=3, norm_topk_prob=True, budget_T=b))
    clipped = f(logits, jnp.array([0, 5, 2, -3]))
    expected = f(logits, jnp.array([1, 3, 2, 1]))
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@st.composite
def expert_choice_case(draw):
    b = draw(st.sampled_from([1, 3]))
    l = draw(st.sampled_from([1, 4, 10]))
    e = draw(st.sampled_from([1, 3, 8]))
    k = draw(st.integers(1, e))
    cf = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0, 8.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    valid = rng.random((b, l)) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    if draw(st.booleans()):  # left padding, as in batched generation
        n = rng.integers(0, l + 1, b)
        valid = np.arange(l)[None, :] >= (l - n)[:, None]
    logits = rng.normal(size=(b, l, e)).astype(np.float32) * 2.0
    return logits, valid, k, cf


@SETTINGS
@given(expert_choice_case())
def test_expert_choice_matches_oracle(case):
    logits, valid, k, cf = case
    b, l, e = logits.shape
    r = expert_choice_jit(jnp.asarray(logits), k=k, capacity_factor=cf,
                          valid_BL=jnp.asarray(valid))
    assert not r.token_major
    bound = min(l, math.ceil(cf * l * k / e))
    assert r.expert_A.shape == (b * e * bound,)
    picks, weights = oracle_expert_choice(logits, valid, k, cf)
    tok = np.asarray(r.token_A).reshape(b, e, bound)
    exp = np.asarray(r.expert_A).reshape(b, e, bound)
    w = np.asarray(r.weight_A).reshape(b, e, bound)
    for i in range(b):
        for j in range(e):
            live = exp[i, j] < e
            assert np.all(exp[i, j][live] == j) and np.all(w[i, j][~live] == 0)
            pos = tok[i, j][live] - i * l
            assert pos.tolist() == picks[(i, j)]  # same tokens, same (best-first) order
            assert live.sum() <= bound  # capacity never exceeded
            assert np.all(valid[i, pos])  # padding never picked
            np.testing.assert_allclose(w[i, j][live], [weights[(i, j, p)] for p in pos],
                                       rtol=2e-6, atol=1e-7)
    picked = {(i, p) for (i, _), ps in picks.items() for p in ps}
    n_unrouted = sum(1 for i in range(b) for p in range(l) if valid[i, p] and (i, p) not in picked)
    assert int(r.unrouted_tokens(jnp.asarray(valid.reshape(-1)))) == n_unrouted
    counts = np.bincount(exp.reshape(-1), minlength=e + 1)[:e]
    assert np.asarray(r.expert_counts()).tolist() == counts.tolist()
    assert counts.tolist() == [sum(len(picks[(i, j)]) for i in range(b)) for j in range(e)]


def test_expert_choice_ties_go_to_the_earlier_position():
    logits = jnp.zeros((1, 6, 4), jnp.float32)  # every token ties for every expert
    r = routing.expert_choice(logits, k=2, capacity_factor=1.0)  # C = ceil(6*2/4) = 3
    tok = np.asarray(r.token_A).reshape(4, 3)
    assert tok.tolist() == [[0, 1, 2]] * 4
    assert int(r.unrouted_tokens()) == 3


def test_expert_choice_is_per_sequence():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
    valid = jnp.asarray(np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], bool))
    both = routing.expert_choice(logits, k=2, capacity_factor=1.0, valid_BL=valid)
    alone = routing.expert_choice(logits[1:], k=2, capacity_factor=1.0, valid_BL=valid[1:])
    w_both = np.asarray(both.combine_weights()).reshape(2, 7, 5)[1]
    w_alone = np.asarray(alone.combine_weights()).reshape(7, 5)
    assert np.array_equal(w_both, w_alone)


def test_expert_capacity_table():
    assert routing.expert_capacities(6, 2, 8, 1.0) == (0, 1, 1, 1, 1, 2, 2)
    assert routing.expert_capacities(4, 8, 8, 4.0) == (0, 1, 2, 3, 4)  # min(L, ...)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        routing.expert_capacities(4, 2, 8, 0)


TINY = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
                        num_experts_per_tok=2)


@pytest.fixture(scope="module")
def tiny_model():
    # jitted init: one compile instead of op-by-op dispatch of every initializer
    return jmoe.Model(TINY, jax.jit(jmoe.init_params, static_argnums=(0, 1))(TINY, 0))


def test_forward_full_budget_bit_identical(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 97, (2, 9))
    plain, _ = jmoe.forward(tiny_model, tokens)
    masked, aux = jmoe.forward(tiny_model, tokens, experts_per_token=np.full((2, 9), 2))
    assert np.array_equal(np.asarray(plain), np.asarray(masked))
    assert int(aux["routed_pairs"]) == 2 * 9 * 2 * 2
    with pytest.raises(ValueError, match="value 3 is outside"):
        jmoe.forward(tiny_model, tokens, experts_per_token=np.full((2, 9), 3))


def test_forward_expert_choice(tiny_model):
    """Expert choice end to end: per-sequence picks and batch independence."""
    model = tiny_model.replace(config=TINY.replace(routing="expert_choice"))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 97, (2, 10))
    mask = np.ones((2, 10), bool)
    mask[1, :3] = False
    logits, aux = jmoe.forward(model, tokens, attention_mask=mask, capture_router_logits=True)
    alone, _ = jmoe.forward(model, tokens[1:, 3:])
    np.testing.assert_allclose(np.asarray(logits)[1, 3:], np.asarray(alone)[0], atol=2e-5)
    # C = ceil(L*k/E): 10*2/8 -> 3 and 7*2/8 -> 2 per expert per layer
    assert np.asarray(aux["expert_counts"]).tolist() == [[5] * 8] * 2
    ids = np.asarray(aux["expert_ids"])  # [layers, B, L, E]
    assert ids.shape == (2, 2, 10, 8)
    assert not np.any(ids[:, 1, :3] < 8)  # padding never picked
    for layer in range(2):
        router = np.asarray(aux["router_logits"])[layer]
        picks, _ = oracle_expert_choice(router, mask, 2, 1.0)
        for (i, j), ps in picks.items():
            assert sorted(np.flatnonzero(ids[layer, i, :, j] == j).tolist()) == sorted(ps)
        unrouted = sum(1 for i in range(2) for p in range(10)
                       if mask[i, p] and not any(p in picks[(i, j)] for j in range(8)))
        assert int(aux["unrouted_tokens"][layer]) == unrouted
    with pytest.raises(ValueError, match="token_choice"):
        jmoe.forward(model, tokens, experts_per_token=np.full((2, 10), 1))


def test_expert_choice_at_full_capacity_is_the_soft_moe(tiny_model):
    """cf = E/k gives C = L: every expert takes every token with weight p_e, which is
    token choice over all E experts without renormalisation."""
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 97, (2, 6))
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)
    ec = tiny_model.replace(config=TINY.replace(routing="expert_choice", capacity_factor=4.0))
    got, aux = jmoe.forward(ec, tokens, attention_mask=mask)
    want, _ = jmoe.forward(tiny_model, tokens, attention_mask=mask, experts_per_token=8)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], rtol=1e-5,
                               atol=1e-5)
    assert np.asarray(aux["unrouted_tokens"]).tolist() == [0, 0]


def test_load_with_expert_choice_matches_transformers_at_full_capacity(hf_olmoe):
    """``jmoe.load(path, routing="expert_choice")`` on an HF folder; with k = E every
    expert picks every token, which is what transformers computes for top-E."""
    torch = pytest.importorskip("torch")
    folder, hf = hf_olmoe(num_experts_per_tok=8)
    model = jmoe.load(folder, routing="expert_choice", tokenizer=False)
    assert model.config.routing == "expert_choice"
    tokens = np.random.default_rng(7).integers(0, 97, (2, 7))
    got, _ = jmoe.forward(model, tokens)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("n,a", [(4, 50), (64, 8192)])
def test_argsort_ids_is_a_stable_argsort(n, a):
    ids = np.random.default_rng(a).integers(0, n + 1, a).astype(np.int32)
    got = np.asarray(routing.argsort_ids(jnp.asarray(ids), n))
    np.testing.assert_array_equal(got, np.argsort(ids, kind="stable"))
