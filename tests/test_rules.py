"""Sampler and router rules checked where they change the result (issue 14 g).

References: the plain Python-loop sampler (tests/sampler_reference.py); the commit
rule's spec (LLaDA commits ``conf >= threshold``, LLaDA2 ``conf > threshold``, at
least a floor, at most the candidates) on exactly representable confidences; a NumPy
oracle of LLaDA2 expert choice that ranks tokens by logit.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import routing
from jmoe.sampling import generate
from jmoe.sampling import remasking as rm
from jmoe.sampling.conventions import CONVENTIONS

from sampler_reference import reference_generate

MASK, EOS, PAD = 96, 3, 1
CONFIG = jmoe.OlmoeConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, causal=False, mask_token_id=MASK,
                          eos_token_id=EOS, pad_token_id=PAD, moe_backend="dense")
ROWS = [[5, 17, 42, 8, 9, 60, 11], [23, 7, 4], [70, 71, 72, 73, 74]]


@pytest.fixture(scope="module")
def eos_model():
    """Peaked random weights, then EOS made the most frequent prediction: its LM-head
    column becomes 1.05 x that of the token predicted most often on a masked canvas."""
    m = jmoe.random_model(CONFIG, seed=0)
    params = dict(jax.tree.map(lambda p: p * 7.5 if p.ndim >= 2 else p, m.params))
    params["lm_head"] = params["lm_head"] * 5
    m = m.replace(params=params)
    canvas = np.array([r + [MASK] * (16 + 7 - len(r)) for r in ROWS])
    logits, _ = jmoe.forward(m, canvas)
    logits = np.asarray(logits).copy()
    logits[..., MASK] = -np.inf
    top = np.bincount(logits.argmax(-1).reshape(-1), minlength=97).argmax()
    params["lm_head"] = params["lm_head"].at[:, EOS].set(params["lm_head"][:, top] * 1.05)
    return m.replace(params=params)


def test_confidence_eos_eot_inf_changes_tokens_like_reference(eos_model):
    kw = dict(gen_length=16, block_length=8, steps=8, early_stop=False)
    tokens = {}
    for option in (False, True):
        out = generate(eos_model, ROWS, confidence_eos_eot_inf=option, **kw)
        ref = reference_generate(eos_model, ROWS, mask_id=MASK, eos_id=EOS, pad_id=PAD,
                                 confidence_eos_eot_inf=option, **kw)
        np.testing.assert_array_equal(out.tokens, ref["tokens"])
        tokens[option] = out.tokens
    assert (tokens[False][:, 7:] == EOS).mean() > 0.2  # EOS is the frequent prediction
    assert not np.array_equal(tokens[False], tokens[True])  # the rule changed the output


def exact_confidences():
    """``[1, 5]`` confidences of the argmax token that float32 softmax gives exactly:
    1 (one finite logit), 0.5 (two equal top logits), 0.25 (four), over a -inf rest."""
    logits = np.full((1, 5, 8), -np.inf, np.float32)
    for g, ties in enumerate((1, 2, 4, 2, 4)):
        logits[0, g, :ties] = 3.0
    x0 = jnp.argmax(logits, -1)
    conf = rm.confidence_low(jnp.asarray(logits), x0, None)
    np.testing.assert_array_equal(np.asarray(conf), [[1.0, 0.5, 0.25, 0.5, 0.25]])
    return conf


def spec_count(conf, candidates, schedule, threshold, strict, floor):
    above = [(c > threshold if strict else c >= threshold) and k
             for c, k in zip(conf, candidates)]
    least = 1 if floor == "one" else schedule
    return min(max(sum(above), least), sum(candidates))


@pytest.mark.parametrize("convention", ["llada", "llada2"])
@pytest.mark.parametrize("floor", ["one", "schedule"])
def test_threshold_at_equality(convention, floor):
    conf_BG = exact_confidences()
    strict = CONVENTIONS[convention].threshold_strict
    assert strict == (convention == "llada2")
    opts = types.SimpleNamespace(thresholded=True, threshold_floor=floor)
    count = CONVENTIONS[convention].commit_count(opts)
    direct = rm.count_threshold(floor, strict=strict)
    for threshold in (0.5, 0.25, 1.0):
        for cand in ([1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 1, 0, 0]):
            cand_BG = jnp.asarray([cand], bool)
            want = spec_count(np.asarray(conf_BG)[0], cand, 1, threshold, strict, floor)
            for fn in (count, direct):
                n_B = fn(conf_BG, cand_BG, jnp.asarray([1]), jnp.float32(threshold))
                assert int(n_B[0]) == want, (convention, floor, threshold, cand)
    # the equality case decides: 0.5 commits the three >= 0.5 (LLaDA) or only the 1.0
    n = count(conf_BG, jnp.ones((1, 5), bool), jnp.asarray([1]), jnp.float32(0.5))
    assert int(n[0]) == (1 if strict else 3)
    committed = rm.commit_mask(conf_BG, jnp.ones((1, 5), bool), n)
    assert np.asarray(committed)[0].tolist() == (
        [True, False, False, False, False] if strict else [True, True, False, True, False])


def oracle_expert_choice(logits_BLE, valid_BL, k, capacity_factor):
    """``[B, L, E]`` bool picked: in each sequence expert e takes the C_b real tokens of
    largest *logit* (float64; the earlier position on a tie)."""
    b, l, e = logits_BLE.shape
    picked = np.zeros((b, l, e), bool)
    for i in range(b):
        real = np.nonzero(valid_BL[i])[0]
        cap = min(len(real), math.ceil(capacity_factor * len(real) * k / e))
        for ex in range(e):
            order = np.argsort(-logits_BLE[i, real, ex].astype(np.float64), kind="stable")
            picked[i, real[order[:cap]], ex] = True
    return picked


def test_llada2_expert_choice_ranks_saturated_logits_by_logit():
    # sigmoid rounds to 1.0 in float32 above ~17: ranked by score, 20, 25 and 30 would
    # tie and the earliest positions would win; ranked by logit, 30 then 25 win
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 4)).astype(np.float32)
    logits[0, :, 0] = [20.0, 18.0, 25.0, 30.0, 19.0, 0.0]
    logits[1, :, 2] = [0.0, 30.0, 20.0, 25.0, 22.0, 21.0]  # the first position is padding
    valid = np.ones((2, 6), bool)
    valid[1, 0] = False
    assert (np.asarray(jax.nn.sigmoid(jnp.asarray(logits[0, :5, 0]))) == 1.0).all()
    r = routing.sigmoid_expert_choice(jnp.asarray(logits), k=1, capacity_factor=1.0,
                                      scaling=2.5, normalize=True, valid_BL=jnp.asarray(valid))
    w_BLE = np.asarray(r.combine_weights()).reshape(2, 6, 4)
    want = oracle_expert_choice(logits, valid, 1, 1.0)
    np.testing.assert_array_equal(w_BLE > 0, want)
    assert want[0, [2, 3], 0].all() and not want[0, [0, 1, 4], 0].any()
    s = np.where(want, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), 0.0)
    s = 2.5 * s / np.maximum(s.sum(-1, keepdims=True), 1e-300)
    np.testing.assert_allclose(w_BLE, s, rtol=1e-6, atol=1e-7)
