"""Resolving ``jmoe.generate``'s options once: the caller, the model, the library.

Every option left ``None`` by the caller is filled, in this order, from the model's
generation defaults (``config.generation``, read from the checkpoint's
``generation_config.json``; keys ``gen_length``, ``block_length``, ``steps``,
``temperature``, ``cfg_scale``, ``remasking``, ``threshold``) and then from the
library's defaults, some of which the convention sets (``steps``, ``threshold_floor``).
Lengths the caller leaves unset are derived from those the caller sets (a default
that does not fit them is fitted: ``Convention.default_block_length``,
``derive_steps``), and the convention's own rule then applies to ``steps`` (LLaDA2
caps it at ``gen_length``). Every value is checked: lengths positive ints (Python or
NumPy integers, never floats), float knobs finite, token ids ints in the vocabulary.
The result is the static ``SamplerOptions`` (what the compiled loop is specialised on)
and the traced knobs (float values that change without recompiling), both built from
the resolved values.

Terms: G generated positions (``gen_length``); *block* ``block_length`` generated
positions decoded together; *step* one model call; *budget* a position's number of
experts; *threshold* the confidence above which a step commits a masked position.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jmoe.sampling import remasking as rm
from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.conventions import (CONVENTIONS, DEFAULT_BLOCK_LENGTH, Convention,
                                       positive_length)
from jmoe.sampling.state import SamplerOptions

DEFAULT_GEN_LENGTH = 128
# the library's defaults of the float and choice options, for every convention
LIBRARY_DEFAULTS = {"temperature": 0.0, "cfg_scale": 0.0, "remasking": "low_confidence",
                    "threshold": None}
_GENERATION_ALIASES = {"gen_length": ("gen_length", "max_new_tokens")}


def resolve_convention(config, convention=None, cache=None) -> tuple[Convention, bool]:
    """The convention object and whether to cache K/V of finished blocks.

    ``convention`` (a name in ``CONVENTIONS`` or a ``Convention``) defaults to llada2 for
    a block-causal model (``attention_block_length`` set) and otherwise to the family's
    (llada2 for LLaDA2 models, else llada). ``cache`` (the exact K/V cache of
    finished blocks) defaults to on for block-causal conventions, except under
    expert-choice routing, which needs the whole sequence in every call.
    """
    if convention is None:
        # a block-causal model generates block by block; else the family's (a class attribute)
        convention = "llada2" if config.attention_block_length else config.default_convention
    if not isinstance(convention, Convention):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention={convention!r}: expected one of {tuple(CONVENTIONS)}")
        convention = CONVENTIONS[convention]
    convention.check_model(config)
    expert_choice = config.routing == "expert_choice"
    if cache is None:
        cache = convention.block_causal and not expert_choice
    if cache and expert_choice:
        raise ValueError("cache=True with routing='expert_choice': each expert picks among "
                         "the whole sequence's tokens, which a cached call on one block does "
                         "not see; use cache=False (the default for expert choice)")
    if cache and not convention.block_causal:
        raise ValueError(f"cache=True needs a block-causal convention such as 'llada2' (got "
                         f"convention={convention.name!r}, which has no block-causal "
                         f"attention)")
    return convention, bool(cache)


def _pick(name: str, value, generation, fallback):
    """The caller's value, else the model's generation default, else ``fallback``."""
    if value is not None:
        return value
    for key in _GENERATION_ALIASES.get(name, (name,)):
        if generation and generation.get(key) is not None:
            return generation[key]
    return fallback


def _real(name: str, value, expected: str, ok) -> float:
    """``value`` as a float if it is a real number (not a bool, a string or an array)
    that ``ok`` accepts, else a ValueError naming the value and ``expected``."""
    arr = None if isinstance(value, (str, bytes)) else np.asarray(value)
    if arr is None or arr.ndim or arr.dtype.kind not in "iuf":  # no bool, str, object
        raise ValueError(f"{name}={value!r} ({type(value).__name__}): expected {expected}")
    v = float(arr)
    if not (math.isfinite(v) and ok(v)):  # nan and inf too
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return v


def _non_negative(name: str, value) -> float:
    return _real(name, value, "a finite number >= 0", lambda v: v >= 0.0)


def _token_id(name: str, value, vocab_size: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value!r}: expected an int token id in [0, {vocab_size})")
    return int(value)


def _lengths(config, conv: Convention, gen_length, block_length, steps) -> tuple[int, int, int]:
    """Caller, else model, else library; unset lengths are derived from the set ones
    (``Convention.default_block_length``, ``derive_steps``), then the convention's cap."""
    gen = config.generation
    caller_set = gen_length is not None or block_length is not None
    gen_length = positive_length("gen_length", _pick("gen_length", gen_length, gen,
                                                     DEFAULT_GEN_LENGTH))
    if block_length is None:
        # the model's generation config, else a block-causal model's own blocks
        model_block = _pick("block_length", None, gen, config.attention_block_length)
        model_block = None if model_block is None else positive_length("block_length",
                                                                        model_block)
        block_length = conv.default_block_length(model_block, gen_length)
    block_length = positive_length("block_length", block_length)
    if steps is None:
        model_steps = _pick("steps", None, gen, None)
        if model_steps is None:
            steps = conv.default_steps(gen_length, block_length)
        else:
            steps = positive_length("steps", model_steps)
            if caller_set:  # the model's steps were chosen for its own lengths
                steps = conv.derive_steps(steps, gen_length, block_length)
    steps = conv.cap_steps(gen_length, positive_length("steps", steps))
    conv.check_lengths(gen_length, block_length, steps)
    return gen_length, block_length, steps


def resolve_options(config, *, gen_length=None, block_length=None, steps=None,
                    temperature=None, cfg_scale=None, remasking=None, threshold=None,
                    threshold_floor=None, adaptive=None, mask_id=None, eos_id=None,
                    logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True,
                    return_trace=False, convention=None,
                    cache=None) -> tuple[SamplerOptions, dict]:
    """Fill every ``None`` option: the caller's value, then ``config.generation``, then
    the library's default (the convention's for ``steps`` and ``threshold_floor``).

    Returns ``(opts, knobs)``: the static ``SamplerOptions`` and the traced float32
    knobs ``{"temperature", "cfg_scale", "threshold"}`` (threshold 1.0 when off), both
    from the resolved values. Raises ValueError on any bad value (see ``jmoe.generate``).
    """
    conv, cache = resolve_convention(config, convention, cache)
    gen = config.generation
    gen_length, block_length, steps = _lengths(config, conv, gen_length, block_length, steps)
    temperature = _non_negative("temperature", _pick("temperature", temperature, gen,
                                                     LIBRARY_DEFAULTS["temperature"]))
    cfg_scale = _non_negative("cfg_scale", _pick("cfg_scale", cfg_scale, gen,
                                                 LIBRARY_DEFAULTS["cfg_scale"]))
    remasking = _pick("remasking", remasking, gen, LIBRARY_DEFAULTS["remasking"])
    threshold = _pick("threshold", threshold, gen, LIBRARY_DEFAULTS["threshold"])
    threshold_floor = conv.threshold_floor if threshold_floor is None else threshold_floor
    if remasking not in rm.REMASKINGS:
        raise ValueError(f"remasking={remasking!r}: expected one of {rm.REMASKINGS}")
    if threshold_floor not in rm.THRESHOLD_FLOORS:
        raise ValueError(f"threshold_floor={threshold_floor!r}: expected one of "
                         f"{rm.THRESHOLD_FLOORS}")
    if threshold is not None:
        threshold = _real("threshold", threshold, "a confidence in (0, 1] or None",
                          lambda v: 0.0 < v <= 1.0)
    if adaptive is not None:
        if not isinstance(adaptive, AdaptiveExperts):
            raise ValueError(f"adaptive={adaptive!r}: expected jmoe.AdaptiveExperts or None")
        adaptive.check_model(config)
    mask_id = mask_id if mask_id is not None else config.mask_token_id
    if mask_id is None:
        raise ValueError("this model has no mask token (config mask_token_id=None): pass "
                         "mask_id=... or load it with mask_token_id=...")
    eos_id = eos_id if eos_id is not None else config.eos_token_id
    opts = SamplerOptions(
        gen_length=gen_length, block_length=block_length, steps=steps, remasking=remasking,
        sampled=temperature > 0, guided=cfg_scale > 0, thresholded=threshold is not None,
        threshold_floor=threshold_floor, adaptive=adaptive,
        mask_id=_token_id("mask_id", mask_id, config.vocab_size),
        eos_id=_token_id("eos_id", eos_id, config.vocab_size),
        logits_eos_inf=bool(logits_eos_inf), confidence_eos_eot_inf=bool(confidence_eos_eot_inf),
        early_stop=bool(early_stop), return_trace=bool(return_trace), convention=conv,
        cached=cache)
    if adaptive is not None:  # the defaults left None come from the model and the steps
        adaptive = adaptive.resolved(config.num_experts_per_tok, opts.steps_per_block)
        adaptive.check_model(config)
        opts = dataclasses.replace(opts, adaptive=adaptive)
    knobs = {"temperature": jnp.float32(temperature), "cfg_scale": jnp.float32(cfg_scale),
             "threshold": jnp.float32(1.0 if threshold is None else float(threshold))}
    return opts, knobs
