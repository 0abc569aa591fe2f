"""DiffusionGemma's uniform-noise, entropy-bounded canvas sampler, as a decoder of the
one compiled loop.

Shape letters: B batch, G generated positions (the loop's region: whole canvases),
K one canvas (``canvas_length``, the loop's ``block_length``), V vocab, H
``stability_threshold``. Terms: the *canvas* is a block of K positions denoised
together from uniform random tokens (there is no mask token); a *step* is one
denoising call (the loop's step); a position is *accepted* (keeps its sample) or
*renoised* (gets a fresh uniform token); the *argmax canvas* is the argmax of the
step's processed logits, the canvas the row keeps; the *renoise count* is the remask
count of the mask-based conventions (it drives ``AdaptiveExperts``).

The rules, as transformers' ``models/diffusion_gemma/generation_diffusion_gemma.py``
(5.25) runs them (read for facts; written here):

- temperature (``LinearTemperatureScheduleLogitsProcessor``): denoising step
  ``n = N .. 1`` (N = ``max_denoising_steps``; the loop's 0-based step ``s`` is
  ``n = N - s``) divides the logits by ``t_min + (t_max - t_min) * n / N``: ``t_max``
  at the first step, ``t_min + (t_max - t_min) / N`` at the last;
- every position draws a sample from ``softmax(processed logits)``;
- acceptance (``EntropyBoundSampler.accept_canvas``, arXiv 2505.24857): positions
  sorted by the entropy of their processed distribution, ascending; position ``i`` of
  that order is accepted iff ``sum_{j <= i} e_j - e_i <= entropy_bound`` (the running
  entropy without itself), so the lowest-entropy one always is; recomputed each step;
- every other position gets a fresh uniform token (``renoise_canvas``);
- self-conditioning: the next step's model call gets this step's processed
  (temperature-scaled) logits; each canvas's first step gets none (the model's zeros);
- stopping (``StableAndConfidentStoppingCriteria``), per row: the argmax canvas equals
  each of the previous ``stability_threshold`` steps' (none exist at the first step of a
  canvas: never stable there unless the threshold is 0) and the mean entropy of the
  processed logits over the canvas is ``< confidence_threshold``; or
  ``max_denoising_steps`` steps. A stopped row keeps its canvas, argmax canvas and
  self-conditioning logits while the others go on; the canvas ends when every row has
  stopped;
- the row keeps its argmax canvas (not the sampled one).

Random stream (a convention of this library, shared with the test's reference):
model call ``nfe`` gives per-position keys ``noise, rand`` as every decoder
(``remasking.step_keys``); the sample is Gumbel-max with ``exponentials(noise, [V])``,
the renoise token is ``randint(rand, [], 0, V)``; the first canvas tokens of generated
position ``g`` of row ``b`` are ``randint(fold_in(fold_in(fold_in(key, INIT_STREAM),
b), g), [], 0, V)``. Ties of entropy are ordered by position (a stable sort; torch's
sort is not stable, so exact ties may accept differently).

Carry (``init_carry``, per canvas, reset when it ends): the self-conditioning logits
``[B, K, V]`` float32, the argmax canvas ``[B, K]``, the last H argmax canvases
``[H, B, K]`` (-1 before any), ``finished_B`` (stopped) and ``next_B`` (computes at
the next step). The loop's carry needed nothing new beyond the decoder's own carry
and a per-row count of calls per block (``SamplerState.block_calls_BN``): the renoise
count is the loop's ``remask_BG`` (a renoised position is a candidate left
uncommitted), and the canvas is the loop's generated region.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.sampling import remasking as rm
from jmoe.sampling.decoders import Decoder

INIT_STREAM = 0x7FFFFFFF  # fold_in data of the first canvases' tokens (model calls use 0..)
# transformers' DiffusionGemmaGenerationConfig._get_default_generation_params, and the
# model config's canvas_length
DEFAULTS = {"gen_length": 256, "canvas_length": 256, "max_denoising_steps": 48,
            "entropy_bound": 0.1, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
            "confidence_threshold": 0.005}


def temperature(step, steps: int, t_min, t_max):
    """The linear schedule at the loop's 0-based ``step`` of ``steps``: ``t_min + (t_max -
    t_min) * n / steps`` with ``n = steps - step`` (float32)."""
    n = (steps - jnp.asarray(step, jnp.int32)).astype(jnp.float32)
    return t_min + (t_max - t_min) * (n / steps)


def entropy(logits_BKV):
    """``[B, K]`` entropy (nats) of ``softmax(logits)`` in float32."""
    logp = jax.nn.log_softmax(logits_BKV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def accept(entropy_BK, cand_BK, bound):
    """``[B, K]`` accepted candidates: in ascending entropy order (ties by position),
    those whose running entropy without themselves is ``<= bound``."""
    e = jnp.where(cand_BK, entropy_BK, jnp.inf)
    order = jnp.argsort(e, axis=-1, stable=True)
    e_sorted = jnp.take_along_axis(e, order, -1)
    # non-candidates sort last; inf - inf is nan, which compares False
    keep_sorted = jnp.cumsum(e_sorted, axis=-1) - e_sorted <= bound
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    return keep & cand_BK


def uniform_tokens(keys_BK, vocab: int):
    """``[B, K]`` int32 uniform tokens in ``[0, vocab)``, one per key."""
    return jax.vmap(jax.vmap(lambda k: jax.random.randint(k, (), 0, vocab)))(keys_BK)


def initial_canvas(key, batch: int, positions_G, vocab: int):
    """``[B, G]`` the first uniform tokens of the generated positions ``positions_G``."""
    k = jax.random.fold_in(key, INIT_STREAM)
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    keys = jax.vmap(fold, in_axes=(0, None))(fold(k, jnp.arange(batch)), positions_G)
    return uniform_tokens(keys, vocab)


def stopped(history_HBK, argmax_BK, entropy_BK, confidence_threshold):
    """``[B]`` StableAndConfident: the argmax canvas equals all H previous ones and the
    mean entropy is below ``confidence_threshold`` (H = 0: stable)."""
    stable = (history_HBK == argmax_BK[None]).all(-1).all(0)
    return stable & (entropy_BK.mean(-1) < confidence_threshold)


@dataclasses.dataclass(frozen=True)
class EntropyBound(Decoder):
    """The entropy-bound sampler and stable-and-confident stop (see the module doc).

    Its candidates are every canvas position of rows still denoising; a step commits
    (``select``) the accepted ones and edits the renoised ones to fresh uniform tokens,
    so the loop's "left uncommitted" count is the renoise count.
    """

    name: str = "entropy_bound"
    stability_threshold: int = 1

    def init_carry(self, batch, block_length, vocab):
        return {"self_cond_BKV": jnp.zeros((batch, block_length, vocab), jnp.float32),
                "argmax_BK": jnp.zeros((batch, block_length), jnp.int32),
                "history_HBK": jnp.full((self.stability_threshold, batch, block_length), -1,
                                        jnp.int32),
                "finished_B": jnp.zeros((batch,), bool), "next_B": jnp.ones((batch,), bool)}

    def reset(self, carry, over):
        b, k, v = carry["self_cond_BKV"].shape
        return jax.tree.map(lambda c, i: jnp.where(over, i, c), carry, self.init_carry(b, k, v))

    def candidates(self, gen_BG, window_G, active_B, carry, opts):
        return window_G & (active_B & ~carry["finished_B"])[:, None]

    def model_inputs(self, carry, step):
        return carry["self_cond_BKV"], step == 0

    def sample(self, logits_BKV, noise_keys, rand_keys, knobs, opts, carry, cand_BK, step):
        """Accepted samples and fresh uniform tokens ``x0_BK``, ``conf_BK`` (``-entropy``
        where accepted, ``-inf`` where renoised) and the carry after the step (rows
        without a candidate keep theirs)."""
        t = temperature(step, opts.steps, knobs["t_min"], knobs["t_max"])
        processed = logits_BKV.astype(jnp.float32) / t
        h_BK = entropy(processed)
        sampled = rm.sample_gumbel(processed, 1.0, noise_keys)
        ok_BK = accept(h_BK, cand_BK, knobs["entropy_bound"])
        x0 = jnp.where(ok_BK, sampled, uniform_tokens(rand_keys, logits_BKV.shape[-1]))
        conf = jnp.where(ok_BK, -h_BK, -jnp.inf)
        argmax_BK = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        done_B = stopped(carry["history_HBK"], argmax_BK, h_BK, knobs["confidence_threshold"])
        run_B = cand_BK.any(-1)
        history = carry["history_HBK"]
        if self.stability_threshold:  # the oldest out, this step's in
            history = jnp.concatenate([history[1:], argmax_BK[None]], 0)
        new = {"self_cond_BKV": processed, "argmax_BK": argmax_BK, "history_HBK": history,
               "finished_B": carry["finished_B"] | done_B}
        # rows that did not compute keep their carry (history's batch axis is 1)
        rows = lambda a, axis: run_B.reshape((1,) * axis + (-1,) + (1,) * (a.ndim - axis - 1))
        carry = {k: jnp.where(rows(n, 1 if k == "history_HBK" else 0), n, carry[k])
                 for k, n in new.items()}
        carry["next_B"] = run_B & ~carry["finished_B"]
        return x0, conf, carry

    def select(self, st, knobs, opts, carry):
        commit = st.cand & (st.conf > -jnp.inf)
        return commit, st.cand & ~commit, carry

    def block_over(self, opts, step, still_BG, carry):
        return (step + 1 >= opts.steps) | ~carry["next_B"].any()

    def block_tokens(self, gen_BG, window_G, over, active_B, carry):
        at = jnp.argmax(window_G)
        placed = jax.lax.dynamic_update_slice_in_dim(gen_BG, carry["argmax_BK"], at, 1)
        return jnp.where(over & active_B[:, None], placed, gen_BG)

    def max_calls(self, opts) -> int:
        return opts.num_blocks * opts.steps
