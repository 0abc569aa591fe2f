"""Gumbel-max sampling reaches the whole distribution (issue 14 f).

The oracle is the exact categorical probability. Float32 uniforms stop at
``1 - 2**-23``, which caps the Gumbel noise near 15.9: a token more than ~16 nats
below the top is then sampled several times too rarely. The library's noise comes
from 64 random bits per draw; the mapping bits -> Exp(1) is checked against a
float64 inverse CDF, and the sampler's tail frequency against the exact probability.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.sampling import remasking


def test_tail_frequency_matches_exact_probability():
    # V=65536, one token at logit 0 and the rest at -17, T=1: a pick outside the top
    # token has probability p = (V-1)e^-17 / (1 + (V-1)e^-17) ~ 2.7e-3. N draws give a
    # binomial count; a correct sampler lands within 6 sigma of N p (fails with
    # probability ~2e-9); capped noise gives ~0.17 N p, far below the bound.
    v, chunk, n_chunks = 65536, 256, 118
    logits_BGV = jnp.full((1, chunk, v), -17.0, jnp.float32).at[..., 0].set(0.0)

    @jax.jit
    def outside(key, nfe):
        noise_BG, _ = remasking.step_keys(key, nfe, 1, jnp.arange(chunk))
        x0_BG = remasking.sample_gumbel(logits_BGV, jnp.float32(1.0), noise_BG)
        return jnp.sum(x0_BG != 0)

    key = jax.random.key(0)
    count = sum(int(outside(key, i)) for i in range(n_chunks))
    n = chunk * n_chunks
    tail = (v - 1) * np.exp(-17.0)
    p = tail / (1 + tail)
    mean, sigma = n * p, np.sqrt(n * p * (1 - p))
    assert abs(count - mean) <= 6 * sigma, (count, mean, sigma)


def test_exponential_from_words_is_the_64_bit_inverse_cdf():
    # words at both ends of (0, 1) and in between against float64 -log u, u the
    # midpoint of the 64-bit cell: the top bit picks the half, 63 bits the distance
    # t = (m + 1/2) 2^-64 from its end (u = t, or u = 1 - t)
    rng = np.random.default_rng(0)
    hi = np.concatenate([[0, 0, 2**31, 2**31, 2**31 - 1, 2**32 - 1, 1, 2**31 + 1],
                         rng.integers(0, 2**32, 1000)]).astype(np.uint32)
    lo = np.concatenate([[0, 7, 0, 2**32 - 1, 2**32 - 1, 2**32 - 1, 0, 5],
                         rng.integers(0, 2**32, 1000)]).astype(np.uint32)
    got = np.asarray(remasking.exponential_from_words(jnp.asarray(hi), jnp.asarray(lo)))
    m = ((hi.astype(np.uint64) & 0x7FFFFFFF) << np.uint64(32)) | lo.astype(np.uint64)
    t = m.astype(np.float64) * 2.0 ** -64 + 2.0 ** -65
    want = np.where(hi >> 31 == 1, -np.log1p(-t), -np.log(t))
    np.testing.assert_allclose(got, want, rtol=3e-7)
    # the noise -log E reaches 44.8 nats (u = 1 - 2^-65), not float32's 15.9
    assert -np.log(got[2]) > 44.0 and got[0] > 44.0
