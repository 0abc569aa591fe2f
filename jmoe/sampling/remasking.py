"""Sampling, confidence and commit rules of one diffusion step.

Shape letters: B batch, G generated positions, V vocab. Terms: a *masked*
position holds the mask token; *committing* it writes its sampled token; the
*confidence* ranks the masked positions of the current block, the rest are
*remasked* (stay masked) for a later step.

Random stream (shared with the test's reference loop): model call ``nfe``
(0-based) uses ``k_noise, k_rand = split(fold_in(key(seed), nfe))`` and generated
position ``g`` of row ``b`` draws from ``fold_in(fold_in(k_noise, b), g)`` (Gumbel
noise ``[V]``, from 64 random bits per token: ``exponentials``) and
``fold_in(fold_in(k_rand, b), g)`` (a random confidence, ``uniforms``). Keys
per position make the stream independent of the call's shape: a row's draws do not
depend on the prompt bucket, and a cached block call (``[B, block_length]`` logits)
draws exactly what the uncached call (``[B, G]``) draws on the block's positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32

REMASKINGS = ("low_confidence", "random")
THRESHOLD_FLOORS = ("one", "schedule")
_TINY = float(jnp.finfo(jnp.float32).tiny)


def step_keys(key, nfe, batch: int, positions_G):
    """Per-position ``(noise_BG, rand_BG)`` keys of model call ``nfe``.

    ``positions_G``: the generated-region indices the call's logits cover (all of
    them uncached, the current block's when cached).
    """
    k_noise, k_rand = jax.random.split(jax.random.fold_in(key, nfe))
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    grid = lambda k: jax.vmap(fold, in_axes=(0, None))(fold(k, jnp.arange(batch)), positions_G)
    return grid(k_noise), grid(k_rand)


def uniforms(key, shape):
    """Float32 uniforms in ``[tiny, 1)`` (random confidences: only their order counts)."""
    return jax.random.uniform(key, shape, jnp.float32, minval=_TINY, maxval=1.0)


def word_pairs(key, shape):
    """Two independent uint32 words ``(hi, lo)`` per element of ``shape``.

    A threefry key (the default) hashes one counter pair per element and keeps both
    output words, as jax's non-partitionable 64-bit ``random_bits`` does (uint32
    ``jax.random.bits`` xors them into one): 64 bits for the price of 32. Other key
    kinds draw ``bits(key, [2, *shape])``.
    """
    n = math.prod(shape)
    if str(jax.random.key_impl(key)) == "threefry2x32":
        words = threefry_2x32(jax.random.key_data(key), jnp.arange(2 * n, dtype=jnp.uint32))
        return words[:n].reshape(shape), words[n:].reshape(shape)
    hi, lo = jax.random.bits(key, (2, *shape), jnp.uint32)
    return hi, lo


def exponential_from_words(hi, lo):
    """``E = -log u`` (Exp(1)) of the 64-bit uniform ``u`` the words ``(hi, lo)`` encode.

    The top bit picks a half of (0, 1) and the other 63 bits ``m`` the distance from
    its end, ``t = (m + 1/2) 2^-64`` in (0, 1/2): ``u = t`` (E = -log t) or ``u = 1 - t``
    (E = -log1p(-t)). Both tails keep float32's relative precision: E spans [2^-65,
    45], so the Gumbel noise ``-log E`` reaches 44.8 where a float32 uniform (steps of
    2^-23) stops at 15.9 and undersamples tokens ~16+ nats below the top.
    """
    m_hi = (hi & jnp.uint32(0x7FFFFFFF)).astype(jnp.float32)
    t = m_hi * 2.0 ** -32 + (lo.astype(jnp.float32) + 0.5) * 2.0 ** -64
    upper = (hi >> 31) == 1
    return jnp.where(upper, -jnp.log1p(-t), -jnp.log(t))


def exponentials(key, shape):
    """Float32 Exp(1) draws, accurate in both tails (``exponential_from_words``)."""
    return exponential_from_words(*word_pairs(key, shape))


def forbid_tokens(logits_BGV, ids):
    """Set the logits of ``ids`` (static ints; None skipped) to -inf."""
    for i in ids:
        if i is not None:
            logits_BGV = logits_BGV.at[..., i].set(-jnp.inf)
    return logits_BGV


def sample_greedy(logits_BGV, temperature, noise_keys_BG):
    del temperature, noise_keys_BG
    return jnp.argmax(logits_BGV, axis=-1).astype(jnp.int32)


def sample_gumbel(logits_BGV, temperature, noise_keys_BG):
    """Gumbel-max: LLaDA's ``argmax exp(l) / E**T`` with ``E = -log u``, in log space.

    ``log(exp(l) / E**T) = l - T log E``: the same argmax without overflowing ``exp``
    in float32 (LLaDA needs float64 for that). ``E`` comes from 64 random bits
    (``exponentials``), so tokens far below the top are sampled at their exact rate.
    """
    v = logits_BGV.shape[-1]
    e_BGV = jax.vmap(jax.vmap(lambda k: exponentials(k, (v,))))(noise_keys_BG)
    noisy = logits_BGV - temperature * jnp.log(e_BGV)
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def confidence_low(logits_BGV, x0_BG, rand_keys_BG, *, unconfident_ids=()):
    """Softmax probability of the sampled token (``low_confidence`` remasking).

    ``unconfident_ids`` get a -inf logit in this softmax only, so a sampled EOS/EOT
    has confidence 0 and is committed last (LLaDA's ``confidence_eos_eot_inf``).
    """
    del rand_keys_BG
    p_BGV = jax.nn.softmax(forbid_tokens(logits_BGV, unconfident_ids), axis=-1)
    return jnp.take_along_axis(p_BGV, x0_BG[..., None], axis=-1)[..., 0]


def confidence_random(logits_BGV, x0_BG, rand_keys_BG, *, unconfident_ids=()):
    """Uniform random confidences (``random`` remasking)."""
    del logits_BGV, x0_BG, unconfident_ids
    return jax.vmap(jax.vmap(lambda k: uniforms(k, ())))(rand_keys_BG)


CONFIDENCES = {"low_confidence": confidence_low, "random": confidence_random}


def top_n(conf_BG, n_B):
    """``[B, G]`` bool: the ``n_b`` most confident positions of each row.

    Ties go to the lower index (a stable sort), like ``torch.topk`` on CPU.
    """
    rank_BG = jnp.argsort(jnp.argsort(-conf_BG, axis=-1, stable=True), axis=-1, stable=True)
    return rank_BG < n_B[:, None]


def count_fixed(conf_BG, candidates_BG, schedule_B, threshold):
    """LLaDA: commit the schedule's count."""
    del conf_BG, threshold
    return jnp.minimum(schedule_B, candidates_BG.sum(-1))


def count_threshold(floor: str, strict: bool = False):
    """Threshold parallel decoding: every candidate with ``conf >= threshold`` (``strict``:
    ``>``, as LLaDA2's generate), at least a floor.

    The floor is 1 (dInfer, Fast-dLLM) or the step's schedule count (LLaDA2).
    """
    if floor not in THRESHOLD_FLOORS:
        raise ValueError(f"threshold_floor={floor!r}: expected one of {THRESHOLD_FLOORS}")

    def count(conf_BG, candidates_BG, schedule_B, threshold):
        above_BG = conf_BG > threshold if strict else conf_BG >= threshold
        confident_B = (candidates_BG & above_BG).sum(-1)
        least_B = jnp.ones_like(schedule_B) if floor == "one" else schedule_B
        return jnp.minimum(jnp.maximum(confident_B, least_B), candidates_BG.sum(-1))

    return count


def commit_mask(conf_BG, candidates_BG, n_B):
    """Commit the ``n_b`` most confident candidates of each row."""
    conf_BG = jnp.where(candidates_BG, conf_BG, -jnp.inf)
    return top_n(conf_BG, n_B) & candidates_BG
