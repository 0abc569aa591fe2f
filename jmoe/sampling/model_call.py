"""The sampler's one door to the model: every model call and every K/V cache it makes.

Shape letters: B batch, L the call's sequence (the whole canvas, or one block of it
when cached), V vocab, S cache length (canvas positions), N kv heads, K head dim.
Terms: *budget* a position's number of experts; *routed pairs* the call's
token-expert assignments summed over layers (the sampler's measure of expert work);
*cached block call* a call on positions ``offset .. offset + L - 1`` only, whose
keys/values are written into the cache and which attends to the cache's earlier
positions (LLaDA2's block-causal attention makes this exact).

Encoder-decoder models (DiffusionGemma, ``Convention.encoder_decoder``) meet a second
contract here: ``encode_call`` (a causal pass that writes the prompt's or a finished
canvas's K/V), ``denoise_call`` (the canvas over the cache, bidirectional, with
self-conditioning logits; it writes nothing) and ``new_encoder_cache``.
``cached_call`` and ``new_block_cache`` pick between the two contracts, so the loop
asks for "a cached call that writes / reads" and never for a family.

Nothing else in ``jmoe.sampling`` imports the model: the sampler meets the model-call
contract (``jmoe.model.apply`` with a ``jmoe.routing.Budget`` and a
``jmoe.kv_cache.KVCache``) here only, so a change of contract means editing this
module only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe import model as model_lib
from jmoe.kv_cache import KVCache
from jmoe.models import diffusion_gemma
from jmoe.models.decoder import positions_from_mask
from jmoe.routing import Budget


def budget_bound(config, opts) -> int:
    """The most experts any position can get: a static bound for the MoE's buffers."""
    return opts.adaptive.maximum if opts is not None and opts.adaptive else \
        config.num_experts_per_tok


def num_moe_layers(config) -> int:
    return config.num_layers - config.first_k_dense_replace


def call_model(params, tokens_BL, valid_BL, budget_BL, *, config, opts, cache=None,
               offset=None, expert_set=None, refresh_set=None):
    """One model call: ``(logits_BLV float32, work int32 [2], cache, expert_set)``; ``work``
    holds the call's routed pairs and its expert reads (distinct experts with rows,
    summed over the MoE layers and the call's rows).

    ``valid_BL`` marks real tokens (invalid ones cost no expert work; their logits are
    garbage). ``budget_BL`` holds per-position expert budgets, used only with
    ``opts.adaptive`` (otherwise every position gets the model's top-k). Without
    ``cache`` the call is bidirectional or block-causal as ``config`` says and returns
    ``cache=None``; with ``cache`` (from ``new_cache``) it is a cached block call at
    absolute position ``offset`` (an int32 scalar, may be traced) and returns the cache
    with this call's K/V written in: keep it to store them, drop it to re-run the block.

    Block expert sets (``opts.adaptive.experts_per_block``): ``expert_set`` bool
    ``[n_moe, B, E]`` the sets to use where ``refresh_set`` (a bool scalar) is False
    (None: every call picks its own); the returned ``expert_set`` holds the sets this
    call used (None without block sets).
    """
    budgets = _budget(config, opts, budget_BL, expert_set, refresh_set)
    if cache is not None:
        # the loop says where each call sits; the cache's own length then needs no tracking
        cache = cache.replace(length=jnp.asarray(offset, jnp.int32))
    logits, aux, cache = model_lib.apply(config, params, tokens_BL, valid_BL=valid_BL,
                                         budgets=budgets, cache=cache)
    return logits, _work(aux), cache, aux.get("expert_set")


def _budget(config, opts, budget_BL, expert_set, refresh_set) -> Budget:
    ad = opts.adaptive if opts is not None else None
    m = ad.experts_per_block if ad else None
    return Budget(budget_BL if ad else None, budget_bound(config, opts),
                  experts_per_block=m, expert_set_rule=ad.expert_set if ad else "mass",
                  set_coverage=ad.set_coverage if ad else 1.0,
                  expert_set=expert_set if m else None,
                  refresh_set=refresh_set if m and expert_set is not None else None)


def _work(aux):
    return jnp.stack([jnp.asarray(aux["routed_pairs"]).sum(),
                      jnp.asarray(aux["distinct_experts"]).sum()]).astype(jnp.int32)


# -- DiffusionGemma: a causal encoder that writes the cache, a canvas decoder that reads it --

def encode_call(params, tokens_BL, valid_BL, budget_BL, *, config, opts, cache, offset):
    """DiffusionGemma's causal pass (the "encoder"): ``(logits_BLV float32, work int32 [2],
    cache)``.

    The tokens sit at absolute positions ``offset .. offset + L - 1`` (an int32 scalar,
    may be traced) in every row; their K/V are written into ``cache`` (from
    ``new_encoder_cache``; sliding-window layers keep the whole length and mask to the
    window) and the returned cache has ``length = offset + L``. ``valid_BL`` False marks
    left padding: never routed, never attended to by this or any later call. Used for the
    prompt and to re-encode each finished canvas before the next one. Logits are the
    tied head's, soft-capped; ``work`` as ``call_model``'s; ``budget_BL`` as there (used
    with ``opts.adaptive`` only; ``opts`` None: the model's top-k).
    """
    budgets = _budget(config, opts, budget_BL, None, None)
    cache = cache.replace(length=jnp.asarray(offset, jnp.int32))
    logits, aux, cache = model_lib.apply(config, params, tokens_BL, valid_BL=valid_BL,
                                         budgets=budgets, cache=cache)
    return logits, _work(aux), cache


def denoise_call(params, canvas_BC, budget_BC, *, config, opts, cache, offset,
                 self_cond_BCV=None, expert_set=None, refresh_set=None, self_cond_mask_B=None):
    """DiffusionGemma's decoder pass over the canvas: ``(logits_BCV float32, work int32 [2],
    expert_set)``.

    The canvas (positions ``offset .. offset + C - 1``) attends bidirectionally to the
    whole canvas and to the cache's real positions ``< offset`` (sliding layers: the last
    ``sliding_window - 1`` of them); it does NOT write the cache. ``self_cond_BCV``: the
    previous step's processed (temperature-scaled) logits ``[B, C, V]``, or None = a zero
    self-conditioning signal (the first step); ``self_cond_mask_B`` (bool ``[B]``, an
    addition to the contract) gives rows set False the zero signal, so a traced loop can
    pass an array every step and mask the first. Logits are after the final soft-cap.
    ``budget_BC``, ``expert_set``, ``refresh_set`` and the returned ``expert_set`` (None
    without block sets) as ``call_model``'s.
    """
    budgets = _budget(config, opts, budget_BC, expert_set, refresh_set)
    logits, aux = model_lib.apply_denoiser(config, params, canvas_BC, cache=cache,
                                           offset=offset, budgets=budgets,
                                           self_cond_BCV=self_cond_BCV,
                                           self_cond_mask_B=self_cond_mask_B)
    return logits, _work(aux), aux.get("expert_set")


def new_encoder_cache(config, batch: int, length: int) -> KVCache:
    """Empty DiffusionGemma encoder K/V buffers for ``batch`` rows over absolute positions
    ``0 .. length - 1`` (prompt + canvases), every layer full length, none valid yet."""
    return diffusion_gemma.new_cache(config, batch, length)


def new_cache(config, batch: int, length: int) -> KVCache:
    """Empty K/V buffers for ``batch`` rows over canvas positions ``0 .. length - 1``
    (``config`` must have block-causal attention)."""
    return KVCache.empty(config, batch, length)


def new_bidirectional_cache(config, valid_BL) -> KVCache:
    """Empty approximate K/V buffers (Fast-dLLM's prefix / dual caches) over the canvas
    ``valid_BL`` of a bidirectional model: positions count from each row's first real
    token, as in an uncached call."""
    return KVCache.bidirectional_empty(config, valid_BL, positions_from_mask(valid_BL))


def new_block_cache(config, opts, batch: int, length: int):
    """The K/V buffers of a cached run: the encoder's (``new_encoder_cache``) under an
    encoder-decoder convention, else the block-causal ``new_cache``."""
    if opts.convention.encoder_decoder:
        return new_encoder_cache(config, batch, length)
    return new_cache(config, batch, length)


def cached_call(params, tokens_BL, valid_BL, budget_BL, *, config, opts, cache, offset,
                write, expert_set=None, refresh_set=None, extra=None):
    """A cached call on positions ``offset .. offset + L - 1``: ``(logits_BLV float32,
    work int32 [2], cache, expert_set)``.

    Block-causal models (``call_model``): one call that reads the cache and writes its
    K/V; ``write`` False only means the caller drops the returned cache. Encoder-decoder
    models (``opts.convention.encoder_decoder``): ``write`` True is ``encode_call``
    (writes K/V; no block expert sets: ``expert_set`` comes back None), False is
    ``denoise_call`` (reads only; ``cache`` comes back unchanged) with ``extra``, the
    decoder's ``(self_cond_BLV float32, first)``: ``first`` (a bool scalar, may be
    traced) gives every row the zero signal (the canvas's first step, as
    ``self_cond_BCV=None``), else the buffer. ``valid_BL`` does not reach ``denoise_call`` (its contract has no
    mask: every canvas position is real).
    """
    if not opts.convention.encoder_decoder:
        return call_model(params, tokens_BL, valid_BL, budget_BL, config=config, opts=opts,
                          cache=cache, offset=offset, expert_set=expert_set,
                          refresh_set=refresh_set)
    if write:
        logits, work, cache = encode_call(params, tokens_BL, valid_BL, budget_BL, config=config,
                                          opts=opts, cache=cache, offset=offset)
        return logits, work, cache, None

    self_cond, mask_B = None, None
    if extra is not None:
        # the canvas's first step gets the zero signal (None and a buffer of zeros differ:
        # softmax of zeros is uniform), by the model's mask rather than a second traced
        # copy of the model under lax.cond
        self_cond, first = extra
        mask_B = jnp.broadcast_to(~jnp.asarray(first, bool), tokens_BL.shape[:1])
    logits, work, used = denoise_call(params, tokens_BL, budget_BL, config=config, opts=opts,
                                      cache=cache, offset=offset, self_cond_BCV=self_cond,
                                      expert_set=expert_set, refresh_set=refresh_set,
                                      self_cond_mask_B=mask_B)
    return logits, work, cache, used
