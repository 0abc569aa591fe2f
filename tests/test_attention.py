"""layers.dot_attention against a float64 NumPy oracle, with and without causal chunks."""

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


@pytest.mark.parametrize("chunk", [None, 4, 3, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_dot_attention_matches_oracle(chunk, causal):
    rng = np.random.default_rng(0)
    b, l, h, n, d = 2, 10, 4, 2, 8
    q, k, v = (rng.normal(size=(b, l, hh, d)) for hh in (h, n, n))
    valid = np.ones((b, l), bool)
    valid[1, :3] = False  # a left-padded row
    bias = layers.attention_bias(jnp.asarray(valid), causal)
    got = layers.dot_attention(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), bias,
                               chunk if causal else None)
    want = oracle(q, k, v, valid, causal)
    seen = ~np.isnan(want[..., 0, 0])
    assert seen[1, :3].sum() == (0 if causal else 3) and seen[0].all()
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], rtol=1e-5, atol=1e-5)
