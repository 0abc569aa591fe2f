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

from jmoe.sampling import decoders as dec
from jmoe.sampling import entropy_bound as eb
from jmoe.sampling import remasking as rm
from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.conventions import (CONVENTIONS, DEFAULT_BLOCK_LENGTH, Convention,
                                       positive_length)
from jmoe.sampling.state import SamplerOptions

DEFAULT_GEN_LENGTH = 128
# the library's defaults of the float and choice options, for every convention
LIBRARY_DEFAULTS = {"temperature": 0.0, "cfg_scale": 0.0, "remasking": "low_confidence",
                    "threshold": None}
_GENERATION_ALIASES = {"gen_length": ("gen_length", "max_new_tokens"),
                       "edit_threshold": ("edit_threshold", "editing_threshold")}
# each decoder's own options (a caller's value for another decoder is refused)
_DECODER_OPTIONS = {"low_threshold": ("hierarchy",), "edit_threshold": ("joint",),
                    "max_post_steps": ("joint",), "credit_alpha": ("credit",),
                    "credit_boost": ("credit",), "credit_decay": ("credit",)}


def resolve_convention(config, convention=None, cache=None) -> tuple[Convention, bool]:
    """The convention object and whether to cache K/V of finished blocks.

    ``convention`` (a name in ``CONVENTIONS`` or a ``Convention``) defaults to llada2 for
    a block-causal model (``attention_block_length`` set) and otherwise to the family's
    (llada2 for LLaDA2 models, else llada). ``cache`` (the exact K/V cache of
    finished blocks) defaults to on for block-causal conventions, except under
    expert-choice routing, which needs the whole sequence in every call.
    """
    dgemma = getattr(config, "family", None) == "diffusion_gemma"
    if convention is None:
        # a block-causal model generates block by block; else the family's (a class attribute)
        convention = ("diffusion_gemma" if dgemma else
                      "llada2" if config.attention_block_length else config.default_convention)
    if not isinstance(convention, Convention):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention={convention!r}: expected one of {tuple(CONVENTIONS)}")
        convention = CONVENTIONS[convention]
    convention.check_model(config)
    if dgemma and not convention.encoder_decoder:
        raise ValueError(f"convention={convention.name!r} on a DiffusionGemma model: it has no "
                         "mask token and generates with convention='diffusion_gemma'")
    if convention.encoder_decoder:  # its canvas always sits over the encoder's K/V cache
        return convention, True
    expert_choice = config.routing == "expert_choice"
    asked = cache
    if cache == "exact":
        cache = True
    elif isinstance(cache, str):  # the approximate caches: resolve_cache checks them
        return convention, False
    if cache is None:
        cache = convention.block_causal and not expert_choice
    if cache and expert_choice:
        raise ValueError(f"cache={asked!r} with routing='expert_choice': each expert picks among "
                         "the whole sequence's tokens, which a cached call on one block does "
                         "not see; use cache=False (the default for expert choice)")
    if cache and not convention.block_causal:
        raise ValueError(f"cache={asked!r} needs a block-causal convention such as 'llada2' (got "
                         f"convention={convention.name!r}, which has no block-causal "
                         f"attention)")
    return convention, bool(cache)


CACHES = (False, True, "exact", "prefix", "dual")
APPROXIMATE_CACHES = ("prefix", "dual")


def resolve_cache(config, convention: Convention, cache, cache_refresh=None,
                  cache_window=None) -> tuple[str | None, int | None, tuple[int, int]]:
    """The approximate cache (Fast-dLLM's ``"prefix"`` or ``"dual"``, or None), its
    refresh interval and its window ``(before, after)``, checked.

    ``cache`` must be one of ``CACHES`` or None (``True``/``"exact"``: the exact cache of
    block-causal conventions, ``resolve_convention``). The approximate caches need a
    bidirectional model under the llada convention and token-choice routing;
    ``cache_refresh`` (a positive int or None) and ``cache_window`` (two ints >= 0 or
    None) need an approximate cache. Raises ValueError naming the bad value.
    """
    if not (cache is None or any(cache is c or (isinstance(cache, str) and cache == c)
                                 for c in CACHES)):
        raise ValueError(f"cache={cache!r}: expected one of False, True, 'exact', 'prefix', "
                         f"'dual' or None")
    approx = cache if cache in APPROXIMATE_CACHES else None
    if approx is None:
        for name, v in (("cache_refresh", cache_refresh), ("cache_window", cache_window)):
            if v is not None:
                raise ValueError(f"{name}={v!r} needs cache='prefix' or 'dual' (got "
                                 f"cache={cache!r})")
        return None, None, (0, 0)
    if convention.block_causal:
        raise ValueError(f"cache={cache!r} is for bidirectional attention; "
                         f"convention={convention.name!r} is block-causal, whose exact cache "
                         f"(cache='exact') already reads every earlier block from the cache")
    if config.mask_kind != "bidirectional":
        raise ValueError(f"cache={cache!r} needs a bidirectional model (this one's attention "
                         f"is {config.mask_kind}); use cache=False")
    if config.routing == "expert_choice":
        raise ValueError(f"cache={cache!r} with routing='expert_choice': each expert picks "
                         f"among the whole sequence's tokens, which a cached call on part of "
                         f"the canvas does not see; use cache=False")
    if cache_refresh is not None:
        cache_refresh = positive_length("cache_refresh", cache_refresh)
    if cache_window is None:
        cache_window = (0, 0)
    ok = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
    if not (isinstance(cache_window, (tuple, list)) and len(cache_window) == 2
            and all(ok(v) for v in cache_window)):
        raise ValueError(f"cache_window={cache_window!r}: expected (before, after), two ints "
                         f">= 0, or None")
    return approx, cache_refresh, (int(cache_window[0]), int(cache_window[1]))


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


def _decoder(config, threshold, given: dict):
    """The decoder (a ``decoders.Decoder``), its resolved threshold and traced knobs from
    the caller's options ``given`` (None: unset), the model's generation defaults and
    the library's (``decoders.DEFAULT_*``)."""
    gen = config.generation
    name = _pick("decoder", given["decoder"], gen, None)
    if name is None:
        name = "fixed" if threshold is None else "threshold"
    if name not in dec.DECODERS:
        raise ValueError(f"decoder={name!r}: expected one of {dec.DECODERS}")
    for opt, users in _DECODER_OPTIONS.items():
        if given[opt] is not None and name not in users:
            raise ValueError(f"{opt}={given[opt]!r} is an option of decoder={users[0]!r}, "
                             f"not of decoder={name!r}")
    if name == "fixed":
        if given["threshold"] is not None:
            raise ValueError(f"threshold={given['threshold']!r} with decoder='fixed' (the "
                             "fixed schedule has no threshold): use decoder='threshold' or "
                             "threshold=None")
        threshold = None  # the model's generation threshold does not apply
    if threshold is None:
        threshold = dec.DEFAULT_THRESHOLD.get(name)
    if threshold is not None:
        threshold = _real("threshold", threshold, "a confidence in (0, 1] or None",
                          lambda v: 0.0 < v <= 1.0)
    pick = lambda k, d: _pick(k, given[k], gen if name in _DECODER_OPTIONS[k] else None, d)
    unit, in_unit = "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0
    knobs = {k: _real(k, pick(k, d), unit, in_unit)
             for k, d in (("low_threshold", dec.DEFAULT_LOW_THRESHOLD),
                          ("edit_threshold", dec.DEFAULT_EDIT_THRESHOLD),
                          ("credit_decay", dec.DEFAULT_CREDIT["credit_decay"]))}
    knobs.update({k: _non_negative(k, pick(k, dec.DEFAULT_CREDIT[k]))
                  for k in ("credit_alpha", "credit_boost")})
    post = pick("max_post_steps", dec.DEFAULT_MAX_POST_STEPS)
    if isinstance(post, bool) or not isinstance(post, (int, np.integer)) or post < 0:
        raise ValueError(f"max_post_steps={post!r}: expected an int >= 0")
    return dec.make(name, int(post)), threshold, knobs


def _sampling_filters(config, top_k, top_p):
    """``top_k`` (a positive int or None) and ``top_p`` (in (0, 1] or None): the caller's,
    else the model's generation defaults."""
    gen = config.generation
    top_k, top_p = _pick("top_k", top_k, gen, None), _pick("top_p", top_p, gen, None)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise ValueError(f"top_k={top_k!r}: expected a positive int or None")
        top_k = None if top_k >= config.vocab_size else int(top_k)  # keeps every token
    if top_p is not None:
        top_p = _real("top_p", top_p, "a probability in (0, 1] or None",
                      lambda v: 0.0 < v <= 1.0)
        top_p = None if top_p >= 1.0 else top_p  # keeps every token
    return top_k, top_p


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
                    return_trace=False, convention=None, cache=None, cache_refresh=None,
                    cache_window=None, decoder=None, low_threshold=None, edit_threshold=None,
                    max_post_steps=None, credit_alpha=None, credit_boost=None,
                    credit_decay=None, top_k=None, top_p=None, canvas_length=None,
                    max_denoising_steps=None, entropy_bound=None, t_min=None, t_max=None,
                    stability_threshold=None,
                    confidence_threshold=None) -> tuple[SamplerOptions, dict]:
    """Fill every ``None`` option: the caller's value, then ``config.generation``, then
    the library's default (the convention's for ``steps`` and ``threshold_floor``).

    Returns ``(opts, knobs)``: the static ``SamplerOptions`` and the traced float32
    knobs ``{"temperature", "cfg_scale", "threshold", "top_p", "low_threshold",
    "edit_threshold", "credit_alpha", "credit_boost", "credit_decay"}`` (threshold and
    top_p 1.0 when off), both from the resolved values. Raises ValueError on any bad
    value (see ``jmoe.generate``). The diffusion_gemma convention resolves its own
    options (``_diffusion_gemma``); its knobs are ``t_min``, ``t_max``, ``entropy_bound``
    and ``confidence_threshold``.
    """
    given = {k: v for k, v in locals().items() if k != "config"}
    dg = {k: given[k] for k in DIFFUSION_GEMMA_OPTIONS}
    if resolve_convention(config, convention, None)[0].encoder_decoder:
        return _diffusion_gemma(config, given)
    for k, v in dg.items():
        if v is not None:
            raise ValueError(f"{k}={v!r} is an option of convention='diffusion_gemma' (a "
                             f"DiffusionGemma model), not of this model's convention")
    approx, cache_refresh, cache_window = resolve_cache(
        config, resolve_convention(config, convention, False)[0], cache, cache_refresh,
        cache_window)
    conv, cache = resolve_convention(config, convention, cache)
    gen = config.generation
    gen_length, block_length, steps = _lengths(config, conv, gen_length, block_length, steps)
    temperature = _non_negative("temperature", _pick("temperature", temperature, gen,
                                                     LIBRARY_DEFAULTS["temperature"]))
    cfg_scale = _non_negative("cfg_scale", _pick("cfg_scale", cfg_scale, gen,
                                                 LIBRARY_DEFAULTS["cfg_scale"]))
    remasking = _pick("remasking", remasking, gen, LIBRARY_DEFAULTS["remasking"])
    given_threshold = threshold
    threshold = _pick("threshold", threshold, gen, LIBRARY_DEFAULTS["threshold"])
    decoder, threshold, decoder_knobs = _decoder(config, threshold, dict(
        decoder=decoder, threshold=given_threshold, low_threshold=low_threshold,
        edit_threshold=edit_threshold, max_post_steps=max_post_steps,
        credit_alpha=credit_alpha, credit_boost=credit_boost, credit_decay=credit_decay))
    top_k, top_p = _sampling_filters(config, top_k, top_p)
    if threshold_floor is None:  # LLaDA2.1's joint decoding commits at least one
        threshold_floor = "one" if decoder.name == "joint" else conv.threshold_floor
    if remasking not in rm.REMASKINGS:
        raise ValueError(f"remasking={remasking!r}: expected one of {rm.REMASKINGS}")
    if remasking != "low_confidence" and decoder.name in ("credit", "hierarchy", "joint"):
        raise ValueError(f"remasking={remasking!r} with decoder={decoder.name!r}: its rule "
                         "compares token probabilities; use remasking='low_confidence'")
    if threshold_floor not in rm.THRESHOLD_FLOORS:
        raise ValueError(f"threshold_floor={threshold_floor!r}: expected one of "
                         f"{rm.THRESHOLD_FLOORS}")
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
        sampled=temperature > 0, guided=cfg_scale > 0,
        thresholded=decoder.name == "threshold",
        threshold_floor=threshold_floor, adaptive=adaptive,
        mask_id=_token_id("mask_id", mask_id, config.vocab_size),
        eos_id=_token_id("eos_id", eos_id, config.vocab_size),
        logits_eos_inf=bool(logits_eos_inf), confidence_eos_eot_inf=bool(confidence_eos_eot_inf),
        early_stop=bool(early_stop), return_trace=bool(return_trace), convention=conv,
        cached=cache, approx_cache=approx, cache_refresh=cache_refresh,
        cache_window=cache_window, decoder=decoder, top_k=top_k, top_p=top_p is not None)
    if adaptive is not None:  # the defaults left None come from the model and the steps
        adaptive = adaptive.resolved(config.num_experts_per_tok, opts.steps_per_block)
        adaptive.check_model(config)
        opts = dataclasses.replace(opts, adaptive=adaptive)
    knobs = {"temperature": jnp.float32(temperature), "cfg_scale": jnp.float32(cfg_scale),
             "threshold": jnp.float32(1.0 if threshold is None else float(threshold)),
             "top_p": jnp.float32(1.0 if top_p is None else top_p),
             **{k: jnp.float32(v) for k, v in decoder_knobs.items()}}
    return opts, knobs


# jmoe.generate's options of the diffusion_gemma convention (generation_config.json keys;
# ``sampler_config.entropy_bound`` nested there, flat here)
DIFFUSION_GEMMA_OPTIONS = ("canvas_length", "max_denoising_steps", "entropy_bound", "t_min",
                           "t_max", "stability_threshold", "confidence_threshold")
# other options and the value that leaves them off under diffusion_gemma
_NOT_DIFFUSION_GEMMA = {"block_length": None, "steps": None, "temperature": None,
                        "cfg_scale": None, "remasking": None, "threshold": None,
                        "threshold_floor": None, "mask_id": None, "logits_eos_inf": False,
                        "confidence_eos_eot_inf": False, "cache_refresh": None,
                        "cache_window": None, "decoder": None, "low_threshold": None,
                        "edit_threshold": None, "max_post_steps": None, "credit_alpha": None,
                        "credit_boost": None, "credit_decay": None, "top_k": None,
                        "top_p": None}
_DG_INSTEAD = {"block_length": "canvas_length", "steps": "max_denoising_steps",
               "temperature": "t_min/t_max"}


def _generation_value(gen, name):
    """``name`` from the model's generation defaults, ``entropy_bound`` also nested in
    ``sampler_config`` (transformers' generation_config.json)."""
    if not gen:
        return None
    if name == "entropy_bound" and gen.get("entropy_bound") is None:
        sc = gen.get("sampler_config")
        return sc.get("entropy_bound") if isinstance(sc, dict) else None
    return _pick(name, None, gen, None)


def _count(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name}={value!r}: expected an int >= {least}")
    return int(value)


def _diffusion_gemma(config, given: dict) -> tuple[SamplerOptions, dict]:
    """The diffusion_gemma convention's options: caller, else the model's generation
    defaults (``config.generation``; ``canvas_length`` also from the model config),
    else transformers' defaults (``entropy_bound.DEFAULTS``); ``gen_length`` rounded up
    to whole canvases. Options of the mask-based conventions are refused."""
    conv = resolve_convention(config, given["convention"], None)[0]
    for k, off in _NOT_DIFFUSION_GEMMA.items():
        if given[k] is not off and given[k] != off:
            hint = f" (use {_DG_INSTEAD[k]})" if k in _DG_INSTEAD else ""
            raise ValueError(f"{k}={given[k]!r} is not an option of "
                             f"convention='diffusion_gemma'{hint}")
    if not (given["cache"] is None or given["cache"] is True or given["cache"] == "exact"):
        raise ValueError(f"cache={given['cache']!r}: convention='diffusion_gemma' always "
                         "runs its canvas over the encoder's K/V cache (None, True or 'exact')")
    gen = config.generation

    def value(name):
        v = given[name] if given[name] is not None else _generation_value(gen, name)
        if v is None and name == "canvas_length":
            v = getattr(config, "canvas_length", None)
        return eb.DEFAULTS[name] if v is None else v

    gen_length = positive_length("gen_length", value("gen_length"))
    canvas = positive_length("canvas_length", value("canvas_length"))
    steps = positive_length("max_denoising_steps", value("max_denoising_steps"))
    stability = _count("stability_threshold", value("stability_threshold"), 0)
    bound = _real("entropy_bound", value("entropy_bound"), "a finite number > 0",
                  lambda v: v > 0)
    conf = _real("confidence_threshold", value("confidence_threshold"),
                 "a finite number > 0", lambda v: v > 0)
    t_min = _non_negative("t_min", value("t_min"))
    t_max = _non_negative("t_max", value("t_max"))
    if t_max <= t_min:
        raise ValueError(f"t_max={t_max!r} <= t_min={t_min!r}: expected the first step's "
                         "temperature t_max above the last's t_min")
    adaptive = given["adaptive"]
    if adaptive is not None:
        if not isinstance(adaptive, AdaptiveExperts):
            raise ValueError(f"adaptive={adaptive!r}: expected jmoe.AdaptiveExperts or None")
        adaptive.check_model(config)
        adaptive = adaptive.resolved(config.num_experts_per_tok, steps)
        adaptive.check_model(config)
    eos_id = given["eos_id"] if given["eos_id"] is not None else config.eos_token_id
    opts = SamplerOptions(
        gen_length=-(-gen_length // canvas) * canvas, block_length=canvas, steps=steps,
        remasking="low_confidence", sampled=True, guided=False, thresholded=False,
        threshold_floor="one", adaptive=adaptive, mask_id=None,
        eos_id=_token_id("eos_id", eos_id, config.vocab_size), logits_eos_inf=False,
        confidence_eos_eot_inf=False, early_stop=bool(given["early_stop"]),
        return_trace=bool(given["return_trace"]), convention=conv, cached=True,
        decoder=eb.EntropyBound(stability_threshold=stability))
    knobs = {"temperature": jnp.float32(1.0), "cfg_scale": jnp.float32(0.0),
             "threshold": jnp.float32(1.0), "top_p": jnp.float32(1.0),
             "t_min": jnp.float32(t_min), "t_max": jnp.float32(t_max),
             "entropy_bound": jnp.float32(bound), "confidence_threshold": jnp.float32(conf)}
    return opts, knobs
