"""A plain Python/NumPy loop of DiffusionGemma's generate, written from transformers'
``models/diffusion_gemma/generation_diffusion_gemma.py`` (5.25): the outer loop over
canvases (encode, denoise, append the argmax canvas, EOS), the inner loop over
denoising steps ``n = N .. 1`` (``LinearTemperatureScheduleLogitsProcessor``,
``EntropyBoundSampler.accept_canvas`` / ``renoise_canvas``,
``StableAndConfidentStoppingCriteria``, finished rows frozen), float64 after the model
call, one row at a time.

Shared with the library, as documented conventions (not rules): the random stream
(``jmoe.sampling.entropy_bound``: Gumbel-max sampling with the 64-bit exponentials of
``sampler_reference``, uniform tokens from ``jax.random.randint`` on per-position
keys), the prompt layout (left-padded to ``bucket_length``, which only moves the
fake model's positions), and one scheduling choice: a row that ended at EOS in an
earlier canvas is not run (transformers runs it and discards its tokens; running it
would only renumber the random stream's model calls).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from jmoe.sampling.canvas import bucket_length

INIT_STREAM = 0x7FFFFFFF


def _keys(key, b, cols):
    """Row ``b``'s per-position keys ``fold_in(fold_in(key, b), g)``."""
    row = jax.random.fold_in(key, b)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(row, jnp.asarray(cols))


@partial(jax.jit, static_argnums=1)
def _randints(keys, v):
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, v))(keys)


@partial(jax.jit, static_argnums=1)
def _words(keys, v):
    return jax.vmap(lambda k: threefry_2x32(jax.random.key_data(k),
                                            jnp.arange(2 * v, dtype=jnp.uint32)))(keys)


def _exponentials(keys, v):
    """``-log u`` of the 64-bit uniform of each token, float64 (``sampler_reference``'s
    words: ``hi = w[:V]``, ``lo = w[V:]``, top bit a half of (0, 1))."""
    w = np.asarray(_words(keys, v))
    hi, lo = w[:, :v].astype(np.uint64), w[:, v:].astype(np.uint64)
    t = (((hi & 0x7FFFFFFF) << np.uint64(32)) | lo).astype(np.float64) * 2.0 ** -64 + 2.0 ** -65
    return np.where(hi >> np.uint64(31) == 1, -np.log1p(-t), -np.log(t))


def _entropy(x):
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def generate(logits_of, params, prompts, *, vocab, gen_length, canvas_length, steps, bound,
             t_min, t_max, stability, confidence, eos_id, pad_id, seed, initial=None,
             maximum=None):
    """Returns dict(tokens [B, maxP + G], steps [B, canvases], nfe, renoise [B, G],
    budget [B, G]) (budgets with linear growth every call when ``initial`` is set)."""
    b_n, c_n = len(prompts), canvas_length
    canvases = -(-gen_length // c_n)
    g_n = canvases * c_n
    p = max(len(r) for r in prompts)
    p_b = bucket_length(p)
    cache_tok = np.zeros((b_n, p_b + g_n), np.int32)
    cache_valid = np.zeros((b_n, p_b + g_n), bool)
    for i, r in enumerate(prompts):
        if r:
            cache_tok[i, p_b - len(r):p_b] = r
            cache_valid[i, p_b - len(r):p_b] = True
    key = jax.random.key(seed)
    k_init = jax.random.fold_in(key, INIT_STREAM)
    gen = np.zeros((b_n, g_n), np.int64)
    renoise = np.zeros((b_n, g_n), np.int64)
    budget = np.full((b_n, g_n), initial if initial else 0, np.int64)
    steps_bk = np.zeros((b_n, canvases), np.int64)
    ended = np.zeros(b_n, bool)  # EOS in an earlier canvas
    nfe = 0
    for k in range(canvases):
        offset = p_b + k * c_n
        cols = np.arange(k * c_n, (k + 1) * c_n)
        canvas = np.stack([np.asarray(_randints(_keys(k_init, b, cols), vocab))
                           for b in range(b_n)]).astype(np.int64)
        argmax = canvas.copy()
        sc = None
        hist = np.full((stability, b_n, c_n), -1)
        done = np.zeros(b_n, bool)
        for n in range(steps, 0, -1):
            run = ~(done | ended)
            if not run.any():
                break
            steps_bk[run, k] += 1
            logits = np.asarray(logits_of(params, canvas, cache_tok, cache_valid, offset,
                                          sc if n < steps else None, vocab), np.float64)
            proc = logits / (t_min + (t_max - t_min) * (n / steps))
            k_noise, k_rand = jax.random.split(jax.random.fold_in(key, nfe))
            nfe += 1
            new_sc = proc if sc is None else sc.copy()
            for b in np.nonzero(run)[0]:
                e = _exponentials(_keys(k_noise, b, cols), vocab)
                sample = np.argmax(proc[b] - np.log(e), -1)
                ent = _entropy(proc[b])
                order = np.argsort(ent, kind="stable")
                cum = np.cumsum(ent[order])
                acc = np.zeros(c_n, bool)
                acc[order] = cum - ent[order] <= bound
                fresh = np.asarray(_randints(_keys(k_rand, b, cols), vocab))
                canvas[b] = np.where(acc, sample, fresh)
                if initial:
                    renoise[b, k * c_n:(k + 1) * c_n] += ~acc
                    grown = np.minimum(initial + renoise[b, k * c_n:(k + 1) * c_n], maximum)
                    budget[b, k * c_n:(k + 1) * c_n] = np.where(
                        ~acc, grown, budget[b, k * c_n:(k + 1) * c_n])
                am = np.argmax(proc[b], -1)
                stable = bool((hist[:, b] == am).all())
                if stability:
                    hist[:, b] = np.roll(hist[:, b], -1, axis=0)
                    hist[-1, b] = am
                done[b] |= stable and ent.mean() < confidence
                argmax[b] = am
                new_sc[b] = proc[b]
            sc = new_sc
        live = ~ended
        gen[live, k * c_n:(k + 1) * c_n] = argmax[live]
        cache_tok[:, offset:offset + c_n] = argmax
        cache_valid[:, offset:offset + c_n] = True
        if eos_id is not None:
            ended |= live & (argmax == eos_id).any(-1)
            if ended.all():
                break
    if eos_id is not None:  # _finalize_canvas: pad after the first EOS, later canvases too
        is_eos = gen == eos_id
        gen = np.where(np.cumsum(is_eos, -1) - is_eos > 0, pad_id, gen)
    lead = np.zeros((b_n, p), np.int64) + pad_id
    for i, r in enumerate(prompts):
        if r:
            lead[i, p - len(r):] = r
    return {"tokens": np.concatenate([lead, gen], 1), "steps": steps_bk, "nfe": nfe,
            "renoise": renoise, "budget": budget}
