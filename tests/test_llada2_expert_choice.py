"""LLaDA2 with ``routing="expert_choice"`` (issue 5, SEEDS.md §5).

Spec: scores ``s = sigmoid(logits)``; in sequence b of real length n every expert
picks its ``C_b = min(n, ceil(cf * n * k / E))`` real tokens of highest score (ties:
the earlier position), the OLMoE capacity rule. A token's weights are the unbiased
scores of the experts that picked it, normalised over them (when top-k > 1) and
times ``routed_scaling_factor``; the shared expert always runs. The group limit is a
token-side rule and does not apply. The oracles below select by ``s + expert_bias``
in float64, the rule as first specified: a per-expert constant cannot change that expert's
ranking of tokens, and jmoe, which leaves the bias out, must agree exactly.

References: a NumPy oracle of the router; the PyTorch reference model
(tests/llada2_reference.py) with its expert-choice option on a checkpoint converted
through the real CLI path; the single-device model for the expert-parallel check
(tests/sharding_checks.py on 8 virtual devices) and across expert backends.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jmoe
from checkpoints_convert.cli import main as convert_main
from jmoe import routing
from jmoe.kv_cache import KVCache
from jmoe.model import apply
from jmoe.routing import Budget
import llada2_reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = ref.TINY["mask_token_id"]
# one compiled call per case is much cheaper than op-by-op dispatch
router = jax.jit(routing.sigmoid_expert_choice,
                 static_argnames=("k", "capacity_factor", "scaling", "normalize"))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# ---- (a) the router against a NumPy oracle written from the spec ----

def oracle(logits_BLE, valid_BL, bias_E, k, cf, scale, normalize):
    """``({(b, e): positions best first}, weights [B, L, E])``, float64."""
    x = np.asarray(logits_BLE, np.float64)
    b, l, e = x.shape
    s = 1 / (1 + np.exp(-x))
    biased = s + np.asarray(bias_E, np.float64)
    picks, w = {}, np.zeros((b, l, e))
    for i in range(b):
        real = np.flatnonzero(valid_BL[i])
        cap = min(len(real), math.ceil(cf * len(real) * k / e))
        for j in range(e):
            picks[(i, j)] = real[np.argsort(-biased[i, real, j], kind="stable")][:cap].tolist()
            w[i, picks[(i, j)], j] = s[i, picks[(i, j)], j]
    if normalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return picks, w * scale


CASES = [  # (b, l, e, k, cf, normalize, left_padding)
    (1, 1, 2, 1, 1.0, True, False),
    (3, 9, 8, 3, 1.0, True, True),
    (2, 7, 8, 2, 0.5, True, False),
    (2, 6, 4, 1, 1.0, False, True),
    (3, 5, 4, 4, 1.0, True, True),   # cf * k / E = 1: C = n, every expert takes everything
    (2, 10, 16, 4, 1.25, True, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_router_matches_oracle(case):
    b, l, e, k, cf, normalize, left = CASES[case]
    rng = np.random.default_rng(case)
    logits = (2.0 * rng.standard_normal((b, l, e))).astype(np.float32)
    logits[0, :, 0] = 0.5  # expert 0 sees a tie across sequence 0: the earlier position wins
    bias = rng.standard_normal(e).astype(np.float32)
    if left:
        valid = np.arange(l)[None, :] >= rng.integers(0, l, b)[:, None]
    else:
        valid = rng.random((b, l)) < 0.8
    r = router(jnp.asarray(logits), k=k, capacity_factor=cf, scaling=2.5, normalize=normalize,
               valid_BL=jnp.asarray(valid))
    picks, want_w = oracle(logits, valid, bias, k, cf, 2.5, normalize)
    bound = min(l, math.ceil(cf * l * k / e))
    tok = np.asarray(r.token_A).reshape(b, e, bound)
    exp = np.asarray(r.expert_A).reshape(b, e, bound)
    for i in range(b):
        for j in range(e):
            live = exp[i, j] < e
            assert np.all(exp[i, j][live] == j)
            pos = tok[i, j][live] - i * l
            assert pos.tolist() == picks[(i, j)]  # same tokens, best first
            n = int(valid[i].sum())
            assert live.sum() == min(n, math.ceil(cf * n * k / e))  # capacity C_b, never more
            assert np.all(valid[i, pos])  # padding never picked
    w = np.asarray(r.combine_weights()).reshape(b, l, e)
    np.testing.assert_allclose(w, want_w, rtol=2e-6, atol=1e-7)
    routed = w.sum(-1) > 0
    if normalize:  # a routed token's weights sum to the scaling, as in token choice
        np.testing.assert_allclose(w.sum(-1)[routed], 2.5, rtol=1e-6)
    assert int(r.unrouted_tokens(jnp.asarray(valid.reshape(-1)))) == int((valid & ~routed).sum())


def test_router_is_per_sequence():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.standard_normal((3, 8, 8)), jnp.float32)
    valid = np.ones((3, 8), bool)
    valid[1, :3] = False
    kw = dict(k=3, capacity_factor=1.0, scaling=2.5)
    both = router(logits, valid_BL=jnp.asarray(valid), **kw)
    alone = router(logits[1:2, 3:], **kw)
    w_both = np.asarray(both.combine_weights()).reshape(3, 8, 8)[1, 3:]
    assert np.array_equal(w_both, np.asarray(alone.combine_weights()))


def test_full_capacity_is_token_choice_over_all_experts():
    """cf = E/k gives C = L: every expert takes every token, the weights are token
    choice's with k = E (all groups, zero bias)."""
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    both = jax.jit(lambda x: (
        routing.sigmoid_expert_choice(x, k=2, capacity_factor=4.0, scaling=2.5),
        routing.sigmoid_group_topk(x.reshape(10, 8), jnp.zeros(8), bound=8, n_group=1,
                                   topk_group=1, scaling=2.5)))
    ec, tc = both(logits)
    np.testing.assert_allclose(np.asarray(ec.combine_weights()), np.asarray(tc.combine_weights()),
                               rtol=1e-6)


# ---- (b) the model against the PyTorch reference, through conversion ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llada2_ec")
    sd = ref.random_checkpoint(ref.TINY, seed=4)
    ref.write_checkpoint(tmp / "hf", ref.TINY, sd)
    assert convert_main(["--hf-dir", str(tmp / "hf"), "--out", str(tmp / "ck"), "--quiet"]) == 0
    return sd, tmp / "ck"


def padded_batch(seed, b=2, l=10, pad=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 69, (b, l))
    valid = np.ones((b, l), bool)
    valid[1, :pad] = False
    return tokens, valid


def reference_logits(sd, tokens, valid, cf, mask4d=None):
    """The reference's logits; ``cf=None``: its (published) token choice."""
    valid_t = torch.as_tensor(valid)
    if mask4d is None:  # full attention over real keys
        mask4d = torch.where(valid_t[:, None, None, :], 0.0, float("-inf"))
    pos = torch.clamp(valid_t.long().cumsum(-1) - 1, min=0)
    with torch.no_grad():
        return ref.forward(sd, ref.TINY, torch.as_tensor(tokens), mask4d, pos,
                           expert_choice=None if cf is None else (valid_t, cf)).numpy()


@pytest.mark.parametrize("cf", [1.0, 0.5])
def test_logits_match_reference_padded_batch(checkpoint, cf):
    sd, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", capacity_factor=cf, moe_backend="dense")
    assert (model.config.routing, model.config.capacity_factor) == ("expert_choice", cf)
    tokens, valid = padded_batch(seed=int(cf * 10))
    logits, aux = jmoe.forward(model, tokens, attention_mask=valid, capture_router_logits=True)
    want = reference_logits(sd, tokens, valid, cf)
    assert rel_err(np.asarray(logits)[valid], want[valid]) < 1e-4
    # C = ceil(cf * n * 3 / 8) per expert for n = 10 and 7 real tokens; 2 MoE layers
    caps = [math.ceil(cf * n * 3 / 8) for n in (10, 7)]
    assert np.asarray(aux["expert_counts"]).tolist() == [[sum(caps)] * 8] * 2
    if cf == 0.5:
        assert np.asarray(aux["unrouted_tokens"]).min() > 0
    # not vacuous: token choice gives other logits
    assert rel_err(reference_logits(sd, tokens, valid, None)[valid], want[valid]) > 1e-3


def test_block_causal_logits_match_reference(checkpoint):
    sd, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", attention_block_length=4,
                      moe_backend="dense")
    tokens = np.random.default_rng(3).integers(0, 69, (1, 11))
    logits, _ = jmoe.forward(model, tokens)
    want = reference_logits(sd, tokens, np.ones((1, 11), bool), 1.0, ref.block_mask(11, 4))
    assert rel_err(logits, want) < 1e-4


def test_expert_bias_has_no_effect(checkpoint):
    """Each expert adds its bias to every token's score alike: it cannot change the picks."""
    _, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", moe_backend="dense")
    zero = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if p[-1].key == "expert_bias" else a, model.params)
    tokens, valid = padded_batch(seed=5)
    got, aux = jmoe.forward(model, tokens, attention_mask=valid, capture_router_logits=True)
    want, aux0 = jmoe.forward(model.replace(params=zero), tokens, attention_mask=valid,
                              capture_router_logits=True)
    assert np.array_equal(np.asarray(aux["expert_ids"]), np.asarray(aux0["expert_ids"]))
    assert np.array_equal(np.asarray(got), np.asarray(want))


# ---- (c) expert backends agree ----

def test_backends_agree(checkpoint):
    _, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", capacity_factor=0.5)
    tokens, valid = padded_batch(seed=5)
    out = {}
    for backend in ("dense", "bucketed"):
        m = model.replace(config=model.config.replace(moe_backend=backend))
        out[backend], aux = jmoe.forward(m, tokens, attention_mask=valid,
                                         capture_router_logits=True)
        assert aux["expert_ids"].shape == (2, 2, 10, 8)  # [layers, B, L, E]: slot e is expert e
    assert rel_err(np.asarray(out["bucketed"])[valid], np.asarray(out["dense"])[valid]) < 1e-5


# ---- (d) expert parallelism: ``llada2_model_expert_choice`` in tests/sharding_checks.py,
# run on meshes (1, 8) and (2, 4) of 8 virtual devices by tests/test_sharding.py ----


# ---- (e) clear errors; uncached generation ----

def test_per_token_budgets_are_an_error(checkpoint):
    _, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice")
    tokens, valid = padded_batch(seed=7)
    with pytest.raises(ValueError, match="routing='expert_choice'"):
        jmoe.forward(model, tokens, experts_per_token=np.full(tokens.shape, 2))
    with pytest.raises(ValueError, match="routing='expert_choice'"):  # inside the model
        jax.eval_shape(lambda: apply(
            model.config, model.params, jnp.asarray(tokens), valid_BL=jnp.asarray(valid),
            budgets=Budget(jnp.full(tokens.shape, 2), 3)))


def test_cached_call_is_an_error(checkpoint):
    _, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", attention_block_length=4)
    cache = KVCache.empty(model.config, 1, 8)
    with pytest.raises(ValueError, match=r"routing='expert_choice'.*cache=False"):
        jax.eval_shape(lambda: apply(
            model.config, model.params, jnp.zeros((1, 4), jnp.int32),
            valid_BL=jnp.ones((1, 4), bool), cache=cache))
    with pytest.raises(ValueError, match=r"routing='expert_choice'.*cache=False"):
        jmoe.generate(model, [[5, 17, 42, 8]], gen_length=4, block_length=4, steps=4,
                      cache=True)


def test_uncached_generate_matches_reference_loop(checkpoint):
    """LLaDA2's generate, one prompt block + one generated block, 4 steps, one commit a
    step (threshold 1.0 is never exceeded, so the schedule count decides). Uncached, the
    model runs on the whole 8-position canvas, so experts pick among all of it; uncached
    is the default under expert choice."""
    sd, ck = checkpoint
    model = jmoe.load(ck, routing="expert_choice", moe_backend="dense")
    prompt = [5, 17, 42, 8]
    out = jmoe.generate(model, [prompt], gen_length=4, block_length=4, steps=4, threshold=1.0)
    x = torch.full((8,), MASK, dtype=torch.long)
    x[:4] = torch.as_tensor(prompt)
    for _ in range(4):
        with torch.no_grad():
            logits = ref.forward(sd, ref.TINY, x[None], ref.block_mask(8, 4), torch.arange(8)[None],
                                 expert_choice=(torch.ones(1, 8, dtype=torch.bool), 1.0))[0, 4:]
        logits[:, MASK] = -torch.inf
        probs = torch.softmax(logits.double(), -1)
        conf, x0 = probs.max(-1)
        conf = torch.where(x[4:] == MASK, conf, -torch.inf)
        i = int(conf.argmax())
        x[4 + i] = x0[i]
    assert out.tokens[0].tolist() == x.tolist()
    assert out.nfe == 4
