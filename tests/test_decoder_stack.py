"""The one decoder stack: every family is a config of it, and any family's block-causal
model gets the exact K/V cache.

References: the uncached model (the cache must change nothing, by construction of
block-causal attention), and the family tests' own references (transformers' OLMoE,
the LLaDA2 PyTorch reference) for the uncached paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe.kv_cache import KVCache
from jmoe.model import apply, param_logical_axes

BLOCK = 4


@pytest.fixture(scope="module")
def block_causal():
    """The shipped default model (OLMoE family, bidirectional) made block-causal."""
    return jmoe.load(attention_block_length=BLOCK, moe_backend="dense")


def test_olmoe_family_block_causal_generates_the_same_with_and_without_cache(block_causal):
    prompts = ["123+456=", "7+8=", "99+1="]  # mixed lengths
    kw = dict(gen_length=6, steps=4, threshold=0.6)
    cached = jmoe.generate(block_causal, prompts, cache=True, **kw)
    plain = jmoe.generate(block_causal, prompts, cache=False, **kw)
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe and cached.texts == plain.texts
    # the default for a block-causal model: its blocks, the llada2 convention, the cache
    default = jmoe.generate(block_causal, prompts, **kw)
    np.testing.assert_array_equal(default.tokens, cached.tokens)


def test_cached_calls_equal_the_uncached_logits(block_causal):
    """Prefill two blocks, then one block at a time: each call's logits are the uncached
    model's at those positions; dropping a call's returned cache re-runs the same block."""
    config, params = block_causal.config, block_causal.params
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size - 1, (2, 4 * BLOCK)), jnp.int32)
    valid = jnp.ones(tokens.shape, bool)
    want, _, _ = apply(config, params, tokens, valid_BL=valid)
    cache = KVCache.empty(config, 2, tokens.shape[1])
    got, _, cache = apply(config, params, tokens[:, :2 * BLOCK],
                          valid_BL=valid[:, :2 * BLOCK], cache=cache)
    assert int(cache.length) == 2 * BLOCK
    parts = [got]
    for start in range(2 * BLOCK, tokens.shape[1], BLOCK):
        part = slice(start, start + BLOCK)
        again, _, dropped = apply(config, params, tokens[:, part], valid_BL=valid[:, part],
                                  cache=cache)
        logits, _, cache = apply(config, params, tokens[:, part], valid_BL=valid[:, part],
                                 cache=cache)
        np.testing.assert_array_equal(again, logits)
        assert int(dropped.length) == int(cache.length) == start + BLOCK
        parts.append(logits)
    # float32: the cached and uncached attention sum in different orders; tolerance
    # relative to the logit scale (as tests/sharding_checks.py's close)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(jnp.concatenate(parts, 1), want, rtol=2e-5, atol=2e-5 * scale)


def test_bidirectional_attention_has_no_cache():
    with pytest.raises(ValueError, match="attention_block_length"):
        KVCache.empty(jmoe.load().config, 1, 8)


def test_block_causal_needs_a_bidirectional_model():
    with pytest.raises(ValueError, match="causal"):
        jmoe.load().config.replace(causal=True, attention_block_length=BLOCK)


def test_logical_axes_are_declared_at_creation():
    """Routed experts carry the ``expert`` axis, shared experts and dense MLPs do not."""
    cfg = jmoe.LLaDA2Config(vocab_size=71, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, intermediate_size=40,
                            moe_intermediate_size=12, num_experts=8, num_experts_per_tok=2,
                            n_group=2, topk_group=1)
    axes = param_logical_axes(cfg)
    shapes = jmoe.model.abstract_params(cfg)
    assert jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    moe = axes["layer_1"]["moe"]
    assert tuple(moe["w_gate"]) == ("expert", "embed", "mlp")
    assert tuple(moe["expert_bias"]) == (None,)
    assert "expert" not in tuple(moe["shared"]["w_gate"])
    assert "expert" not in tuple(axes["layer_0"]["mlp"]["w_up"])
