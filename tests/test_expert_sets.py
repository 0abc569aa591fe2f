"""Block expert sets (issue 16) against a NumPy float64 reference written from the rule.

The rule (``jmoe.routing.block_expert_set``, ``mass``): per MoE layer and sequence, the
M experts with the largest router score summed over the sequence's real tokens (OLMoE:
softmax probabilities; LLaDA2: ``sigmoid(logit) + expert_bias``), ties to the lower id.
Each real token then takes its top-k_i within the set by the model's own rule:
  OLMoE   rank by the softmax over all E, weights those probabilities, renormalised
          over the kept experts when ``norm_topk_prob``;
  LLaDA2  excluded experts are absent: a group scores its (up to) two best allowed
          biased scores, the ``topk_group`` best groups compete, rank by biased score,
          weights the unbiased sigmoid scores normalised over the kept set, x scaling.
Also: at most M distinct experts per layer and sequence, M = E equal to the
unrestricted model bit for bit, the MoE layer's output through every CPU backend
(gathered set weights) against a float64 oracle, the sampler's rules, bad values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import routing
from jmoe.moe import MoE
from jmoe.routing import Budget


def softmax64(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_mass_set(scores_BLE, valid_BL, m):
    mass = np.where(valid_BL[..., None], scores_BLE, 0.0).sum(1)
    allowed = np.zeros(mass.shape, bool)
    for b in range(mass.shape[0]):
        allowed[b, np.argsort(-mass[b], kind="stable")[:m]] = True
    return allowed


def ref_olmoe(logits_BLE, valid_BL, budget_BL, m, norm):
    """({(b, l): {expert: weight}}, allowed_BE) from the rule."""
    x = np.asarray(logits_BLE, np.float64)
    p = softmax64(x)
    allowed = ref_mass_set(p, valid_BL, m)
    out = {}
    for b, l in zip(*np.nonzero(valid_BL)):
        cand = [e for e in np.argsort(-p[b, l], kind="stable") if allowed[b, e]]
        kept = np.array(cand[:budget_BL[b, l]])
        w = p[b, l, kept] / (p[b, l, kept].sum() if norm else 1.0)
        out[(b, l)] = dict(zip(kept.tolist(), w.tolist()))
    return out, allowed


def ref_llada2(logits_BLE, bias_E, valid_BL, budget_BL, m, n_group, topk_group, scaling):
    x = np.asarray(logits_BLE, np.float64)
    s = sigmoid64(x)
    biased = s + np.asarray(bias_E, np.float64)
    allowed = ref_mass_set(biased, valid_BL, m)
    e = x.shape[-1]
    per = e // n_group
    out = {}
    for b, l in zip(*np.nonzero(valid_BL)):
        score = {}
        for g in range(n_group):
            vals = sorted((biased[b, l, j] for j in range(g * per, (g + 1) * per)
                           if allowed[b, j]), reverse=True)
            score[g] = sum(vals[:2]) if vals else -np.inf
        groups = sorted(range(n_group), key=lambda g: (-score[g], g))[:topk_group]
        cand = [j for g in groups for j in range(g * per, (g + 1) * per) if allowed[b, j]]
        cand = sorted(cand, key=lambda j: (-biased[b, l, j], j))[:budget_BL[b, l]]
        w = s[b, l, cand] / s[b, l, cand].sum() * scaling
        out[(b, l)] = dict(zip(cand, w.tolist()))
    return out, allowed


def routes(r, b, l):
    ids, w = (np.asarray(a) for a in r.per_token())
    e = r.num_experts
    return {(i // l, i % l): {int(j): float(v) for j, v in zip(ids[i], w[i]) if j < e}
            for i in range(b * l) if (ids[i] < e).any()}


def assert_same_routes(got, want, tol=2e-6):
    assert got.keys() == want.keys()
    for key in want:
        assert list(got[key]) == list(want[key]), (key, got[key], want[key])
        np.testing.assert_allclose(list(got[key].values()), list(want[key].values()),
                                   rtol=tol, atol=tol)


def olmoe_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                head_dim=8, moe_intermediate_size=8, num_experts=16, num_experts_per_tok=3,
                causal=False, mask_token_id=96, eos_token_id=3, pad_token_id=1,
                moe_backend="dense")
    return jmoe.OlmoeConfig(**(base | kw))


def llada2_cfg(**kw):
    base = dict(vocab_size=71, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2,
                head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=16,
                num_experts_per_tok=3, n_group=4, topk_group=2, num_shared_experts=1,
                first_k_dense_replace=1, routed_scaling_factor=2.5, mask_token_id=70,
                eos_token_id=69, pad_token_id=69, moe_backend="dense")
    return jmoe.LLaDA2Config(**(base | kw))


def case(b=2, l=10, e=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, l, e)) * 2.0
    valid = np.ones((b, l), bool)
    valid[0, :3] = False
    budget = rng.integers(1, k + 1, (b, l))
    return logits, valid, budget, rng


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("m", [3, 5, 16])
@pytest.mark.parametrize("per_token", [False, True])
def test_olmoe_restricted_routing_matches_reference(norm, m, per_token):
    cfg = olmoe_cfg(norm_topk_prob=norm)
    logits, valid, budget, _ = case()
    if not per_token:
        budget = np.full_like(budget, 3)
    want, want_set = ref_olmoe(logits, valid, budget, m, norm)
    bud = Budget(jnp.asarray(budget, jnp.int32) if per_token else None, 3, experts_per_block=m)
    lg = jnp.asarray(logits, jnp.float32)
    allowed = routing.block_expert_set(cfg, lg, {}, jnp.asarray(valid), bud)
    np.testing.assert_array_equal(np.asarray(allowed), want_set)
    r = routing.route(cfg, lg, {}, jnp.asarray(valid), bud, allowed)
    assert_same_routes(routes(r, 2, 10), want)


@pytest.mark.parametrize("m", [3, 4, 7, 16])
def test_llada2_restricted_routing_matches_reference(m):
    cfg = llada2_cfg()
    logits, valid, budget, rng = case(seed=1)
    bias = rng.normal(size=(16,)) * 0.3
    want, want_set = ref_llada2(logits, bias, valid, budget, m, 4, 2, 2.5)
    params = {"expert_bias": jnp.asarray(bias, jnp.float32)}
    bud = Budget(jnp.asarray(budget, jnp.int32), 3, experts_per_block=m)
    lg = jnp.asarray(logits, jnp.float32)
    allowed = routing.block_expert_set(cfg, lg, params, jnp.asarray(valid), bud)
    np.testing.assert_array_equal(np.asarray(allowed), want_set)
    r = routing.route(cfg, lg, params, jnp.asarray(valid), bud, allowed)
    assert_same_routes(routes(r, 2, 10), want)


def ref_topk_mass_set(scores_BLE, valid_BL, m, k):
    b, l, e = scores_BLE.shape
    mass = np.zeros((b, e))
    for i, j in zip(*np.nonzero(valid_BL)):
        top = np.argsort(-scores_BLE[i, j], kind="stable")[:k]
        mass[i, top] += scores_BLE[i, j, top]
    allowed = np.zeros((b, e), bool)
    for i in range(b):
        allowed[i, np.argsort(-mass[i], kind="stable")[:m]] = True
    return allowed


@pytest.mark.parametrize("family", ["olmoe", "llada2"])
def test_topk_mass_rule_matches_reference(family):
    logits, valid, _, rng = case(seed=5)
    if family == "olmoe":
        cfg, params, scores = olmoe_cfg(), {}, softmax64(logits)
    else:
        bias = rng.normal(size=(16,)) * 0.3
        cfg, params = llada2_cfg(), {"expert_bias": jnp.asarray(bias, jnp.float32)}
        scores = sigmoid64(logits) + bias
    bud = Budget(None, 3, experts_per_block=4, expert_set_rule="topk_mass")
    got = routing.block_expert_set(cfg, jnp.asarray(logits, jnp.float32), params,
                                   jnp.asarray(valid), bud)
    want = ref_topk_mass_set(scores, valid, 4, 3)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not (want == ref_mass_set(scores, valid, 4)).all()  # the two rules differ here


def test_given_sets_and_refresh():
    """``first_step``'s carry: a given set is used where refresh is False, mass picks
    where it is True."""
    cfg = olmoe_cfg()
    logits, valid, _, _ = case(seed=2)
    given = np.zeros((2, 16), bool)
    given[:, [1, 4, 9, 12]] = True
    lg, v = jnp.asarray(logits, jnp.float32), jnp.asarray(valid)
    for refresh, want in ((False, given), (True, ref_mass_set(softmax64(logits), valid, 4))):
        bud = Budget(None, 3, experts_per_block=4, expert_set=jnp.asarray(given),
                     refresh_set=jnp.bool_(refresh))
        np.testing.assert_array_equal(np.asarray(routing.block_expert_set(cfg, lg, {}, v, bud)),
                                      want)


# -- the MoE layer through the CPU backends: the gathered set against a float64 oracle -------

def moe_oracle(x_BLD, params, routes_, b, l):
    x = np.asarray(x_BLD, np.float64)
    y = np.zeros_like(x)
    wg, wu, wd = (np.asarray(params[n], np.float64) for n in ("w_gate", "w_up", "w_down"))
    for (i, j), experts in routes_.items():
        for e, w in experts.items():
            h = x[i, j] @ wg[e]
            y[i, j] += w * ((h / (1 + np.exp(-h))) * (x[i, j] @ wu[e])) @ wd[e]
    return y


@pytest.mark.parametrize("backend", ["dense", "bucketed", "ragged", "cpu_gmm", "pallas"])
def test_moe_layer_with_sets_matches_oracle(backend):
    cfg = olmoe_cfg(moe_backend=backend, norm_topk_prob=True)
    rng = np.random.default_rng(3)
    b, l, d, e = 2, 10, 16, 16
    x = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
    valid = np.ones((b, l), bool)
    valid[1, :2] = False
    block = MoE(cfg)
    f = 8
    params = {"router": rng.normal(size=(d, e)) * 0.8,
              "w_gate": rng.normal(size=(e, d, f)) / np.sqrt(d),
              "w_up": rng.normal(size=(e, d, f)) / np.sqrt(d),
              "w_down": rng.normal(size=(e, f, d)) / np.sqrt(f)}
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    budget = rng.integers(1, 4, (b, l))
    bud = Budget(jnp.asarray(budget, jnp.int32), 3, experts_per_block=5)
    y, aux = jax.jit(lambda p: block.apply({"params": p}, x, jnp.asarray(valid), bud))(params)
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    want_routes, want_set = ref_olmoe(logits, valid, budget, 5, True)
    np.testing.assert_array_equal(np.asarray(aux["expert_set"]), want_set)
    want = moe_oracle(x, params, want_routes, b, l)
    err = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
    assert err < 2e-5, err
    used = [len({e_ for (i, _), ex in want_routes.items() if i == s for e_ in ex})
            for s in range(b)]
    np.testing.assert_array_equal(np.asarray(aux["distinct_experts"]), used)


# -- whole models: <= M distinct experts, M = E changes nothing ---------------------------------

def tiny_model(family):
    if family == "olmoe":
        cfg = olmoe_cfg(num_layers=2, hidden_size=32, num_experts=8, num_experts_per_tok=2,
                        moe_backend="auto")
    else:
        cfg = llada2_cfg(num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                         hidden_size=32, num_layers=3, moe_backend="auto")
    model = jmoe.random_model(cfg, seed=0)
    return model.replace(params=jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p,
                                             model.params))


@pytest.mark.parametrize("family", ["olmoe", "llada2"])
def test_model_distinct_experts_bounded_and_full_set_exact(family):
    model = tiny_model(family)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 60, (2, 12))
    mask = np.ones((2, 12), int)
    mask[1, :4] = 0
    base, aux0 = jmoe.forward(model, tokens, attention_mask=mask, capture_router_logits=True)
    full, aux8 = jmoe.forward(model, tokens, attention_mask=mask, experts_per_block=8,
                              capture_router_logits=True)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(aux8["expert_ids"]), np.asarray(aux0["expert_ids"]))
    assert int(np.asarray(aux0["distinct_experts"]).max()) > 2  # the bound below can bite
    for m in (2, 3):
        _, aux = jmoe.forward(model, tokens, attention_mask=mask, experts_per_block=m,
                              capture_router_logits=True)
        assert int(np.asarray(aux["distinct_experts"]).max()) <= m
        ids = np.asarray(aux["expert_ids"])  # [n_moe, B, L, K]
        sets = np.asarray(aux["expert_set"])  # [n_moe, B, E]
        assert (sets.sum(-1) == m).all()
        for layer in range(ids.shape[0]):
            for b in range(2):
                used = set(ids[layer, b][ids[layer, b] < 8].tolist())
                assert used <= set(np.flatnonzero(sets[layer, b]).tolist())
                assert len(used) == int(np.asarray(aux["distinct_experts"])[layer, b])


def test_bad_values_refused_in_one_line():
    model = tiny_model("olmoe")
    tokens = [[1, 2, 3]]
    for bad, what in ((1, "top-k=2..num_experts=8"), (9, "top-k=2..num_experts=8"),
                      (2.5, "expected an int"), (True, "expected an int")):
        with pytest.raises(ValueError, match=r"experts_per_block=") as err:
            jmoe.forward(model, tokens, experts_per_block=bad)
        assert what in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="experts_per_block=3: expected an int in top-k=4"):
        jmoe.forward(model, tokens, experts_per_block=3, experts_per_token=4)
    ec = jmoe.random_model(olmoe_cfg(routing="expert_choice", num_experts=8), seed=0)
    with pytest.raises(ValueError, match="routing='token_choice'"):
        jmoe.forward(ec, tokens, experts_per_block=4)
    with pytest.raises(ValueError, match="expert_set='nope': expected one of"):
        jmoe.AdaptiveExperts(experts_per_block=4, expert_set="nope")
    with pytest.raises(ValueError, match=r"experts_per_block=1: expected an int in top-k=2"):
        jmoe.generate(model, [[1, 2, 3]], gen_length=4,
                      adaptive=jmoe.AdaptiveExperts(experts_per_block=1))
    with pytest.raises(ValueError, match=r"experts_per_block=3: expected an int >= maximum=4"):
        jmoe.AdaptiveExperts(maximum=4, experts_per_block=3)


# -- the sampler: mass and first_step sets against the plain-loop reference --------------------

from sampler_reference import reference_generate  # noqa: E402

from jmoe.sampling import AdaptiveExperts, generate  # noqa: E402

SAMPLER_ROWS = [[5, 17, 42, 8, 9, 60, 11], [23, 7, 4], [70, 71, 72, 73, 74]]


@pytest.fixture(scope="module")
def sampler_model():
    cfg = olmoe_cfg(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    m = jmoe.random_model(cfg, seed=0)
    params = dict(jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p, m.params))
    params["lm_head"] = params["lm_head"] * 5
    return m.replace(params=params)


SAMPLER_CASES = {
    "mass_budgets": dict(gen_length=16, block_length=8, steps=8,
                         adaptive=AdaptiveExperts(initial=1, maximum=3, update_interval=1,
                                                  experts_per_block=3)),
    "first_step_blocks": dict(gen_length=16, block_length=8, steps=8,
                              adaptive=AdaptiveExperts(initial=2, maximum=2, update_interval=1,
                                                       experts_per_block=3,
                                                       expert_set="first_step")),
    "first_step_cfg_threshold": dict(gen_length=16, block_length=8, steps=8, cfg_scale=0.5,
                                     threshold=0.5,
                                     adaptive=AdaptiveExperts(
                                         growth="exponential", initial=1, maximum=4,
                                         update_interval=2, experts_per_block=4,
                                         expert_set="first_step")),
}


@pytest.mark.parametrize("name", list(SAMPLER_CASES))
def test_sampler_sets_match_reference(sampler_model, name):
    kw = SAMPLER_CASES[name]
    out = generate(sampler_model, SAMPLER_ROWS, return_trace=True, **kw)
    ref = reference_generate(sampler_model, SAMPLER_ROWS, mask_id=96, eos_id=3, pad_id=1, **kw)
    np.testing.assert_array_equal(out.tokens, ref["tokens"])
    assert out.nfe == ref["nfe"] and out.expert_work == ref["expert_work"]
    assert out.expert_reads == int(sum(d.sum() for d in ref["trace"]["distinct_experts"]))
    m = kw["adaptive"].experts_per_block
    assert max(d.max() for d in ref["trace"]["distinct_experts"]) <= m
    if kw["adaptive"].expert_set == "first_step":  # one set per block, kept for the block
        sets, blocks = ref["trace"]["expert_set"], ref["trace"]["block"]
        for i in range(1, len(sets)):
            if blocks[i] == blocks[i - 1]:
                np.testing.assert_array_equal(sets[i], sets[i - 1])


def test_sampler_sets_cut_reads_and_full_set_is_exact(sampler_model):
    kw = dict(gen_length=16, block_length=8, steps=8)
    ad = dict(initial=2, maximum=2, update_interval=1)
    plain = generate(sampler_model, SAMPLER_ROWS, adaptive=AdaptiveExperts(**ad), **kw)
    full = generate(sampler_model, SAMPLER_ROWS,
                    adaptive=AdaptiveExperts(**ad, experts_per_block=8), **kw)
    np.testing.assert_array_equal(full.tokens, plain.tokens)
    assert full.expert_reads == plain.expert_reads
    few = generate(sampler_model, SAMPLER_ROWS,
                   adaptive=AdaptiveExperts(**ad, experts_per_block=2), **kw)
    n_calls_rows_layers = few.nfe * len(SAMPLER_ROWS) * 2
    assert few.expert_reads <= 2 * n_calls_rows_layers < plain.expert_reads


def test_adaptive_defaults_from_the_model():
    ad = AdaptiveExperts()
    assert ad.resolved(4, 6) == AdaptiveExperts(initial=2, maximum=4, update_interval=1)
    assert ad.resolved(8, 32) == AdaptiveExperts(initial=4, maximum=8, update_interval=4)
    assert AdaptiveExperts(growth="exponential", initial=1).resolved(8, 32).update_interval == 5
    assert AdaptiveExperts(initial=6).resolved(4, 6).maximum == 6


def peaked_block_causal_llada2():
    """A tiny block-causal LLaDA2 (8 experts, top-2 in 2 of 4 groups) with weights x7.5,
    so router scores and logits are well separated."""
    cfg = llada2_cfg(num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                     hidden_size=32, num_layers=3, attention_block_length=4,
                     moe_backend="auto")
    model = jmoe.random_model(cfg, seed=1)
    return model.replace(params=jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p,
                                             model.params))


def test_llada2_cached_generation_with_sets():
    """The K/V cache (LLaDA2, block-causal): M = E is exact, first_step sets bound the
    experts every call reads (prefill, steps and block fills)."""
    model = peaked_block_causal_llada2()
    rows = [[5, 17, 42, 8, 9, 60], [23, 7, 4, 50, 2, 31, 11, 12]]
    kw = dict(gen_length=8, block_length=4, steps=4, cache=True)
    ad = dict(initial=2, maximum=2, update_interval=1)
    plain = generate(model, rows, adaptive=AdaptiveExperts(**ad), **kw)
    full = generate(model, rows, adaptive=AdaptiveExperts(**ad, experts_per_block=8,
                                                          expert_set="first_step"), **kw)
    np.testing.assert_array_equal(full.tokens, plain.tokens)
    assert full.expert_reads == plain.expert_reads and full.nfe == plain.nfe
    few = generate(model, rows, adaptive=AdaptiveExperts(**ad, experts_per_block=2,
                                                         expert_set="first_step"), **kw)
    calls = few.nfe + 1 + 4  # steps, the prefill, at most one fill per block of the canvas
    assert few.expert_reads <= 2 * 2 * len(rows) * calls
    assert few.expert_reads < plain.expert_reads


# -- sets with the caches and decoders of issue 15 (threaded through the same step) -----------

@pytest.mark.parametrize("cache, rule", [("prefix", "mass"), ("dual", "first_step")])
def test_approximate_caches_with_sets(sampler_model, cache, rule):
    """Fast-dLLM's caches: with ``cache_refresh=1`` every call runs the whole canvas, so a
    run with sets is the uncached run with the same sets (tokens, calls, work, reads);
    without refresh the window calls read at most M experts per layer and row."""
    kw = dict(gen_length=16, block_length=8, steps=8, early_stop=False,
              adaptive=AdaptiveExperts(initial=1, maximum=2, update_interval=1,
                                       experts_per_block=3, expert_set=rule))
    base = generate(sampler_model, SAMPLER_ROWS, cache=False, **kw)
    got = generate(sampler_model, SAMPLER_ROWS, cache=cache, cache_refresh=1, **kw)
    np.testing.assert_array_equal(got.tokens, base.tokens)
    assert (got.nfe, got.expert_work, got.expert_reads) == \
        (base.nfe, base.expert_work, base.expert_reads)
    stale = generate(sampler_model, SAMPLER_ROWS, cache=cache, **kw)
    assert 0 < stale.expert_reads <= 3 * stale.nfe * len(SAMPLER_ROWS) * 2


def test_llada2_idle_blocks_decoder_and_sets():
    """LLaDA2 rows of mixed lengths (a block with no row's masks makes no call: its work and
    sets are zeros, the decoder's carry passes through) under the credit decoder, cached
    and not: M = E is the run without sets, first_step sets bound every call's reads."""
    model = peaked_block_causal_llada2()
    rows = [[5, 17, 42], list(range(30, 51))]  # regions in blocks 0-2 and 5-6
    ad = dict(initial=2, maximum=2, update_interval=1)
    for cache in (False, True):
        kw = dict(gen_length=6, block_length=4, steps=3, cache=cache, decoder="credit",
                  threshold=0.6, return_trace=True)
        plain = generate(model, rows, adaptive=AdaptiveExperts(**ad), **kw)
        full = generate(model, rows, adaptive=AdaptiveExperts(**ad, experts_per_block=8,
                                                              expert_set="first_step"), **kw)
        np.testing.assert_array_equal(full.tokens, plain.tokens)
        assert (full.nfe, full.expert_work, full.expert_reads) == \
            (plain.nfe, plain.expert_work, plain.expert_reads)
        assert not {3, 4} & set(np.asarray(full.trace["block"]).tolist())  # no calls
        few = generate(model, rows, adaptive=AdaptiveExperts(**ad, experts_per_block=2,
                                                             expert_set="first_step"), **kw)
        calls = few.nfe + (1 + 7 if cache else 0)  # steps, the prefill, block fills
        assert few.expert_reads <= 2 * 2 * len(rows) * calls
        assert few.expert_reads < plain.expert_reads


def ref_coverage_set(mass_BE, m, coverage, least):
    """The ``set_coverage`` refinement as a loop: the M largest experts in order, each
    kept while the mass before it is below ``coverage`` of the total, or while fewer
    than ``least`` are kept."""
    allowed = np.zeros(mass_BE.shape, bool)
    for b in range(mass_BE.shape[0]):
        total, before = mass_BE[b].sum(), 0.0
        for i, e in enumerate(np.argsort(-mass_BE[b], kind="stable")[:m]):
            if before < coverage * total or i < least:
                allowed[b, e] = True
            before += mass_BE[b, e]
    return allowed


@pytest.mark.parametrize("rule", ["mass", "topk_mass"])
@pytest.mark.parametrize("coverage", [0.3, 0.6, 0.9])
def test_set_coverage_matches_reference(rule, coverage):
    logits, valid, _, _ = case(seed=7)
    logits = logits * 1.5  # peaked: some sequences need fewer than M experts
    p = softmax64(logits)
    if rule == "mass":
        mass = np.where(valid[..., None], p, 0.0).sum(1)
    else:
        mass = np.zeros((2, 16))
        for i, j in zip(*np.nonzero(valid)):
            top = np.argsort(-p[i, j], kind="stable")[:3]
            mass[i, top] += p[i, j, top]
    want = ref_coverage_set(mass, 8, coverage, least=3)
    bud = Budget(None, 3, experts_per_block=8, expert_set_rule=rule, set_coverage=coverage)
    got = routing.block_expert_set(olmoe_cfg(), jnp.asarray(logits, jnp.float32), {},
                                   jnp.asarray(valid), bud)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want.sum(1).min() >= 3 and want.sum(1).max() <= 8
    if coverage < 0.9:
        assert want.sum(1).min() < 8  # the refinement dropped experts here


def test_forward_set_coverage_matches_reference():
    # jmoe.forward's sets against the loop refinement of each layer's captured router
    # mass (rule mass: softmax summed over the sequence's real tokens)
    model = tiny_model("olmoe")
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 60, (2, 12))
    mask = np.ones((2, 12), int)
    mask[1, :4] = 0
    whole, _ = jmoe.forward(model, tokens, attention_mask=mask, experts_per_block=6)
    same, _ = jmoe.forward(model, tokens, attention_mask=mask, experts_per_block=6,
                           set_coverage=1.0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(whole))
    logits, aux = jmoe.forward(model, tokens, attention_mask=mask, experts_per_block=6,
                               set_coverage=0.5, capture_router_logits=True)
    sets = np.asarray(aux["expert_set"])  # [n_moe, B, E]
    p = softmax64(np.asarray(aux["router_logits"], np.float64))  # [n_moe, B, L, E]
    for layer in range(sets.shape[0]):
        mass = np.where(mask[..., None] == 1, p[layer], 0.0).sum(1)
        np.testing.assert_array_equal(sets[layer], ref_coverage_set(mass, 6, 0.5, least=2))
    assert sets.sum(-1).min() < 6  # the refinement dropped experts here
    assert not np.array_equal(np.asarray(logits), np.asarray(whole))
    for bad, what in ((0.0, r"set_coverage=0.0: expected a float in \(0, 1\]"),
                      (True, "set_coverage=True: expected"),
                      (0.9, "set_coverage=0.9 refines block expert sets: it needs "
                            "experts_per_block")):
        with pytest.raises(ValueError, match=what) as e:
            jmoe.forward(model, tokens, experts_per_block=None if bad == 0.9 else 6,
                         set_coverage=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="AdaptiveExperts set_coverage=0.9 refines"):
        AdaptiveExperts(set_coverage=0.9)


def test_sampler_set_coverage_reads_fewer_experts(sampler_model):
    kw = dict(gen_length=16, block_length=8, steps=8)
    ad = dict(initial=2, maximum=2, update_interval=1, experts_per_block=6)
    whole = generate(sampler_model, SAMPLER_ROWS, adaptive=AdaptiveExperts(**ad), **kw)
    same = generate(sampler_model, SAMPLER_ROWS,
                    adaptive=AdaptiveExperts(**ad, set_coverage=1.0), **kw)
    np.testing.assert_array_equal(same.tokens, whole.tokens)
    part = generate(sampler_model, SAMPLER_ROWS,
                    adaptive=AdaptiveExperts(**ad, set_coverage=0.5), **kw)
    assert part.expert_reads < whole.expert_reads
    assert part.expert_reads >= 2 * part.nfe * len(SAMPLER_ROWS) * 2  # at least top-k=2
    for bad in (0.0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match=r"set_coverage=.*expected a float in \(0, 1\]") as e:
            AdaptiveExperts(experts_per_block=6, set_coverage=bad)
        assert "\n" not in str(e.value)
