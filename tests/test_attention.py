"""Attention against float64 NumPy oracles, with and without causal chunks: both
``layers.dot_attention`` (on CPU with jmoe's kernels, the compiled ``jmoe_attention``)
and the XLA formulation ``layers.xla_attention`` (chunked, blocked)."""

from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest

from jmoe import layers


def oracle(q, k, v, valid, causal):
    """Softmax attention, GQA, float64; rows of queries that see no key are NaN."""
    b, l, h, d = q.shape
    n = k.shape[2]
    out = np.full((b, l, h, d), np.nan)
    for bi in range(b):
        for i in range(l):
            keys = [j for j in range(l) if valid[bi, j] and (not causal or j <= i)]
            if not keys:
                continue
            for hh in range(h):
                kv = hh // (h // n)
                s = np.array([q[bi, i, hh] @ k[bi, j, kv] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hh] = sum(pj * v[bi, j, kv] for pj, j in zip(p, keys))
    return out


# dot_attention dispatches by the target platform's kernel table (jmoe.platform): the CPU
# table (the jmoe_attention kernel where it builds, blocked XLA over 512+ keys) and the
# GPU/TPU one (one jax.nn.dot_product_attention), here both run on the CPU
IMPLS = {"dispatch": partial(layers.dot_attention, platform="cpu"),
         "dispatch_accelerator": partial(layers.dot_attention, platform="gpu"),
         "xla": partial(layers.xla_attention, blocked=True)}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("chunk", [None, 4, 3, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_dot_attention_matches_oracle(chunk, causal, impl):
    rng = np.random.default_rng(0)
    b, l, h, n, d = 2, 10, 4, 2, 8
    q, k, v = (rng.normal(size=(b, l, hh, d)) for hh in (h, n, n))
    valid = np.ones((b, l), bool)
    valid[1, :3] = False  # a left-padded row
    bias = layers.attention_bias(jnp.asarray(valid), causal)
    got = IMPLS[impl](*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), bias,
                      chunk if causal else None)
    want = oracle(q, k, v, valid, causal)
    seen = ~np.isnan(want[..., 0, 0])
    assert seen[1, :3].sum() == (0 if causal else 3) and seen[0].all()
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], rtol=1e-5, atol=1e-5)


def oracle_vec(q, k, v, allowed_BLS):
    """Vectorised float64 softmax attention with GQA; rows with no allowed key are NaN."""
    h, n = q.shape[2], k.shape[2]
    kk, vv = (np.repeat(t, h // n, axis=2) for t in (k, v))
    s = np.einsum("blhd,bshd->bhls", q, kk) / np.sqrt(q.shape[-1])
    s = np.where(allowed_BLS[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, vv)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,blocks", [(11, dict(q_block=4, k_block=3)), (520, "xla"),
                                           (520, "dispatch"), (520, "dispatch_accelerator")])
def test_blocked_attention_matches_oracle(causal, length, blocks):
    """Small blocks through ``blocked_attention``; S=520 (>= BLOCKED_MIN_KEYS, not a
    multiple of the key block) through ``xla_attention``'s dispatch and
    ``dot_attention``'s."""
    rng = np.random.default_rng(1)
    b, h, n, d = 2, 4, 2, 8
    q, k, v = (rng.normal(size=(b, length, hh, d)) for hh in (h, n, n))
    valid = np.ones((b, length), bool)
    valid[1, :5] = False
    bias = layers.attention_bias(jnp.asarray(valid), causal)
    args = [jnp.asarray(t, jnp.float32) for t in (q, k, v)]
    if isinstance(blocks, dict):
        got = layers.blocked_attention(*args, bias, causal=causal, **blocks)
    else:
        assert length >= layers.BLOCKED_MIN_KEYS
        got = IMPLS[blocks](*args, bias, layers.CAUSAL_CHUNK if causal else None)
    allowed = np.broadcast_to(valid[:, None, :], (b, length, length))
    if causal:
        allowed = allowed & np.tril(np.ones((length, length), bool))
    want = oracle_vec(q, k, v, allowed)
    seen = allowed.any(-1)
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["blocked", "dispatch"])
def test_attention_with_a_cache_shaped_bias(impl):
    """Few queries over many keys with a ``[B, 1, L, S]`` block-causal bias (the cached
    sampler's call shape)."""
    rng = np.random.default_rng(2)
    b, lq, s, h, n, d, bl = 2, 8, 40, 4, 2, 8, 8
    q, k, v = (rng.normal(size=(b, ln, hh, d)) for ln, hh in ((lq, h), (s, n), (s, n)))
    q_pos = np.broadcast_to(np.arange(16, 24), (b, lq))
    k_pos = np.broadcast_to(np.arange(s), (b, s))
    key_valid = np.ones((b, s), bool)
    key_valid[0, 30:] = False
    bias = layers.block_causal_bias(jnp.asarray(q_pos), jnp.asarray(k_pos), jnp.asarray(key_valid),
                                    bl)
    args = [jnp.asarray(t, jnp.float32) for t in (q, k, v)]
    if impl == "blocked":
        got = layers.blocked_attention(*args, bias, q_block=3, k_block=7)
    else:
        got = layers.dot_attention(*args, bias)
    allowed = (k_pos[:, None, :] // bl <= q_pos[:, :, None] // bl) & key_valid[:, None, :]
    np.testing.assert_allclose(np.asarray(got), oracle_vec(q, k, v, allowed), rtol=2e-5,
                               atol=2e-5)


def rope_oracle(x, positions, rotary_dim, theta):
    """NeoX rotary in float64: pair dims j and j + R/2 of the first R dims, rotated by
    the angle ``position * theta^(-2j/R)``; dims from R on pass through."""
    out = x.astype(np.float64).copy()
    half = rotary_dim // 2
    for j in range(half):
        ang = positions.astype(np.float64)[:, :, None] * theta ** (-2.0 * j / rotary_dim)
        a, b = x[..., j].astype(np.float64), x[..., j + half].astype(np.float64)
        out[..., j] = a * np.cos(ang) - b * np.sin(ang)
        out[..., j + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("rotary_dim,head_dim", [(16, 16), (8, 16), (4, 24)])
def test_xla_rope_forward_matches_float64_oracle(rotary_dim, head_dim):
    """The XLA rotary (``layers.xla_rope``, the gradient path and every non-CPU target)
    directly: full and partial rotary, NeoX halves layout."""
    rng = np.random.default_rng(rotary_dim + head_dim)
    x = rng.normal(size=(2, 9, 3, head_dim)).astype(np.float32)
    pos = np.stack([np.arange(9), np.arange(40, 49)])  # a later window too
    theta = 10000.0
    want = rope_oracle(x, pos, rotary_dim, theta)
    # exact float64 tables rounded once to float32: xla_rope alone
    inv = theta ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    ang = pos[:, :, None] * np.concatenate([inv, inv])
    got = layers.xla_rope(jnp.asarray(x), jnp.asarray(np.cos(ang), jnp.float32),
                          jnp.asarray(np.sin(ang), jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
    # with jmoe's float32 tables: angles up to ~50 rad carry float32 rounding
    cos, sin = layers.rope_tables(jnp.asarray(pos), rotary_dim, theta)
    got = layers.xla_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[..., rotary_dim:], x[..., rotary_dim:])
