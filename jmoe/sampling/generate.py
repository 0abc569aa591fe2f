"""``jmoe.generate``: masked-diffusion generation (LLaDA and LLaDA2 conventions) with
adaptive expert budgets and, for LLaDA2, an exact K/V cache of finished blocks.

Shape letters: B batch, P the batch's longest prompt, G generated positions
(``gen_length``), L the canvas, V vocab, S model calls. Diffusion terms: *mask* the
mask token on a position not yet generated; *block* ``block_length`` generated
positions decoded before the next block starts; *step* one model call; *commit*
writing a sampled token for good; *remask* a masked position a step leaves masked;
*budget* a position's number of experts (``experts_per_token``).

Host-side work only: resolve the options once (``options.resolve_options``), tokenise
the prompts, let the convention lay them onto a canvas (``Convention.layout``), call
the compiled loop (``jmoe.sampling.loop.run``) once, and let the convention cut the
output back (``Convention.output``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import platform as platform_lib
from jmoe import tokenizer as tokenizer_lib
from jmoe.sampling import loop
from jmoe.sampling.canvas import GenerateOutput, bucket_length
from jmoe.sampling.options import resolve_convention, resolve_options

__all__ = ["generate", "GenerateOutput", "bucket_length", "resolve_options",
           "resolve_convention"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _row(i: int, p) -> list[int]:
    """One prompt's token ids as a list of ints: a 1-D integer array, or a list/tuple
    of ints; anything else (floats, bools, nested rows) a ValueError naming it."""
    if isinstance(p, (np.ndarray, jax.Array)):
        if p.ndim != 1:
            raise ValueError(f"prompt {i} has shape {tuple(p.shape)}: expected a 1-D row of "
                             f"token ids")
        if p.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} has dtype {p.dtype}: expected integer token ids")
        return np.asarray(p).tolist()
    if not isinstance(p, (list, tuple)):
        raise ValueError(f"prompt {i} is {p!r} ({type(p).__name__}): expected a row of int "
                         f"token ids (a list, a tuple or a 1-D integer array)")
    for t in p:
        if not _is_int(t):
            raise ValueError(f"prompt {i} holds {t!r} ({type(t).__name__}): expected int "
                             f"token ids")
    return [int(t) for t in p]


def _encode(model, prompts) -> list[list[int]]:
    """The prompts as rows of int token ids (strings through the tokenizer)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim not in (1, 2):
            raise ValueError(f"a prompts array has shape {tuple(prompts.shape)}: expected "
                             f"[P] (one prompt) or [B, P] token ids")
        if prompts.dtype.kind not in "iu":
            raise ValueError(f"prompts have dtype {prompts.dtype}: expected integer token ids")
        arr = np.asarray(prompts)
        return [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts is a {type(prompts).__name__}: expected a string, a list "
                         f"of strings, or token ids (a list of ints, a list of rows, an "
                         f"array)")
    if not prompts:
        raise ValueError("prompts is an empty list: expected at least one prompt (a string "
                         "or a row of token ids; [[]] is one empty prompt)")
    if tokenizer_lib.is_chat(prompts):  # conversations: the tokenizer's chat template
        if model.tokenizer is None:
            raise ValueError("chat prompts need a model with a tokenizer; pass token ids")
        return tokenizer_lib.chat_ids(model.tokenizer, prompts)
    if all(isinstance(p, str) for p in prompts):
        if model.tokenizer is None:
            raise ValueError("string prompts need a model with a tokenizer; pass token ids")
        return [list(model.tokenizer.encode(p)) for p in prompts]
    if all(_is_int(t) for t in prompts):  # one prompt as a flat list of ids
        return [[int(t) for t in prompts]]
    if any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts mixes strings and token ids: expected all strings or all "
                         "token ids")
    if not any(isinstance(p, (list, tuple, np.ndarray, jax.Array)) for p in prompts):
        return [_row(0, list(prompts))]  # a flat list with a non-int: name it
    return [_row(i, p) for i, p in enumerate(prompts)]


def _check_tokens(rows: list[list[int]], vocab: int) -> None:
    for i, r in enumerate(rows):
        bad = next((t for t in r if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt {i} has token id {bad} outside the vocabulary [0, {vocab})")


def random_key(seed):
    """The sampler's key: an int seed in ``[0, 2**64)``, all 64 bits used (a seed below
    2**32 gives ``jax.random.key(seed)``, which keeps only 32 bits of larger ones)."""
    if not _is_int(seed) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed={seed!r} ({type(seed).__name__}): expected an int in "
                         f"[0, 2**64)")
    seed = int(seed)
    if seed < 2 ** 31 or jax.config.jax_default_prng_impl != "threefry2x32":
        return jax.random.key(seed if seed < 2 ** 63 else seed - 2 ** 64)
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),
                                    impl="threefry2x32")


def generate(model, prompts, *, gen_length=None, block_length=None, steps=None,
             temperature=None, cfg_scale=None, remasking=None, threshold=None,
             threshold_floor=None, adaptive=None, mask_id=None, eos_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True, seed=0,
             return_trace=False, convention=None, cache=None, cache_refresh=None,
             cache_window=None, decoder=None, low_threshold=None, edit_threshold=None,
             max_post_steps=None, credit_alpha=None, credit_boost=None, credit_decay=None,
             top_k=None, top_p=None, canvas_length=None, max_denoising_steps=None,
             entropy_bound=None, t_min=None, t_max=None, stability_threshold=None,
             confidence_threshold=None) -> GenerateOutput:
    """Generate by masked diffusion (LLaDA or LLaDA2) or uniform-noise canvas diffusion
    (DiffusionGemma), all steps in one compiled loop.

    An option left ``None`` takes the model's generation default (``config.generation``,
    from the checkpoint's ``generation_config.json``) if it has one for it, else the
    library's default given below ("model, else ..."). See SEEDS.md §1, §3.

    Args:
        model: a ``jmoe.Model`` (``jmoe.load``, ``jmoe.random_model``).
        prompts: a string, a list of strings (needs ``model.tokenizer``), or token ids:
            one list / 1-D array, a list of them, or a ``[B, P]`` array. Rows may differ
            in length; each generates as it would alone. Or chat: one conversation (a
            list of ``{"role", "content"}`` dicts) or a list of them, rendered by the
            tokenizer's chat template with the generation prompt added
            (``jmoe.tokenizer.chat_prompts``); a tokenizer without a template (the
            shipped model's) is a ValueError.
        gen_length: int, tokens to generate per row. Model, else 128. Lengths are
            positive Python or NumPy ints, never floats.
        block_length: int, generated positions decoded before the next block starts.
            Model, else the model's ``attention_block_length`` if set, else 32; unset,
            it is fitted to ``gen_length``: llada (``gen_length`` must be a multiple)
            takes that default if it divides ``gen_length``, else ``gen_length`` (one
            block); llada2 takes it as is, or ``min(32, gen_length)`` for the library's.
        steps: int, model calls of the fixed schedule. Model, else llada: ``gen_length``
            (over the whole generation; a multiple of the number of blocks); llada2:
            ``block_length`` (counted per block). The model's value, when the caller
            sets ``gen_length`` or ``block_length``, is fitted to them (llada: at most
            ``gen_length``, a multiple of the blocks). llada2 then caps any value at
            ``gen_length`` as LLaDA2's generate does
            (``steps = min(steps, gen_length // minimal_topk)``, ``minimal_topk`` 1).
        temperature: finite float >= 0, Gumbel-max sampling temperature; 0 is argmax.
            Model, else 0. Under llada2 the confidence at ``temperature > 0`` is the
            tempered probability of the sampled token (``softmax(l / T)``, after
            ``top_k``/``top_p``), as LLaDA2's ``_sample_with_temperature_topk_topp``;
            under llada it is ``softmax(l)`` as LLaDA's and dInfer's.
        cfg_scale: finite float >= 0, classifier-free guidance ``un + (cfg_scale + 1) *
            (cond - un)`` with the prompt masked for ``un``; 0 is off. Model, else 0.
        remasking: ``"low_confidence"`` (commit the most probable sampled tokens) or
            ``"random"`` (random confidences). Model, else ``"low_confidence"``.
        threshold: float in (0, 1] or None: threshold parallel decoding, each step
            commits every masked position of the block with confidence >= threshold
            (llada2: strictly >). Model, else None (off: the fixed schedule); with a
            ``decoder``: its threshold (default threshold 0.9, credit 0.9, joint 0.7,
            hierarchy off).
        decoder: which positions a step writes (``jmoe.sampling.decoders``):
            ``"fixed"`` (LLaDA's schedule), ``"threshold"`` (Fast-dLLM / dInfer),
            ``"credit"`` (dInfer's credit decoder, arXiv 2510.06133: a per-block credit
            per token, decayed by ``credit_decay`` each step, boosted by the top-1
            probability to the power ``credit_boost``, added to the logits as
            ``credit_alpha * log(1 + credit)`` before the threshold rule),
            ``"hierarchy"`` (dInfer's: in each contiguous run of masked positions the
            most confident if above ``low_threshold``, every one above ``threshold``,
            always the top one), ``"joint"`` (LLaDA2.1's joint threshold decoding: masks
            committed above ``threshold``, written tokens replaced when another token's
            confidence passes ``edit_threshold``; up to ``max_post_steps`` edit-only
            steps after a block's last mask; S mode ``threshold=0.5,
            edit_threshold=0.0``, Q mode ``threshold=0.7, edit_threshold=0.5``).
            Credit, hierarchy and joint run a block until it has no mask (``steps``
            does not bound them). Model, else ``"threshold"`` if a threshold is set,
            else ``"fixed"``.
        low_threshold: float in [0, 1], hierarchy only. Model, else 0.4 (dInfer's).
        edit_threshold: float in [0, 1], joint only (``editing_threshold`` in a
            generation config). Model, else 0.5.
        max_post_steps: int >= 0, joint only. Model, else 16 (LLaDA2.1's).
        credit_alpha, credit_boost, credit_decay: credit only; finite floats >= 0
            (decay in [0, 1]). Model, else 0.7, 0.2, 0.8 (dInfer's).
        top_k: positive int or None: sampling keeps the ``top_k`` most probable tokens
            (ties at the k-th kept). Model, else None (all). No effect at temperature 0.
        top_p: float in (0, 1] or None: nucleus sampling on ``softmax(l / T)``, the
            smallest set of most probable tokens whose mass exceeds ``top_p`` (after
            ``top_k``, as LLaDA2's reference). Model, else None. No effect at
            temperature 0.
        threshold_floor: ``"one"`` (at least 1 commit a step, as dInfer/Fast-dLLM) or
            ``"schedule"`` (at least the schedule's count, as LLaDA2). Default: the
            convention's, llada ``"one"``, llada2 ``"schedule"``.
        adaptive: ``jmoe.AdaptiveExperts`` or None: per-token expert budgets that grow
            while a position stays masked. Default None (the model's top-k everywhere).
        mask_id: int token id of the mask. Default: ``config.mask_token_id``.
        eos_id: int token id of EOS (early stop, text cut). Default:
            ``config.eos_token_id``.
        logits_eos_inf: bool, never predict EOS. Default False.
        confidence_eos_eot_inf: bool, a sampled EOS gets confidence 0 (committed last).
            Default False.
        early_stop: bool, a row stops after a block in which it committed EOS; its later
            positions become EOS. Default True.
        seed: int in ``[0, 2**64)``, the random stream's key (temperature > 0, random
            remasking); all 64 bits count (below 2**32 it is ``jax.random.key(seed)``).
            Default 0.
        return_trace: bool, per model call arrays in ``GenerateOutput.trace``. Default
            False.
        convention: ``"llada"`` (prompt-relative blocks, ``steps`` over the whole
            generation) or ``"llada2"`` (LLaDA2's generate: blocks aligned to absolute
            positions, the first may hold the prompt's tail; block-causal attention;
            ``steps`` per block; stop after a block holding EOS). Default: llada2 for a
            block-causal model (``attention_block_length`` set, any family) and for
            LLaDA2 models, else llada.
        cache: ``False``, ``True``, ``"exact"``, ``"prefix"`` or ``"dual"``.
            ``True``/``"exact"`` (llada2 only: block-causal attention): keys/values of
            the prompt and of each finished block are computed once and each step runs
            the model on the current block only (the same tokens, with ``cfg_scale`` and
            ``temperature`` too). ``"prefix"`` and ``"dual"`` (bidirectional models under
            llada; Fast-dLLM's approximate caches, dual is dInfer's default): a block's
            first step runs the whole canvas and stores every position's K/V; each later
            step runs the block and everything after it, reading the prefix's K/V from
            the cache (prefix), or the block only, reading the prefix's and the suffix's
            (dual). Stale K/V make the tokens differ from the uncached run's; with
            ``cache_refresh=1`` they are the uncached tokens. Default: ``"exact"`` for
            llada2, except under expert-choice routing; else False.
        cache_refresh: int >= 1 or None, approximate caches only: also refresh (run the
            whole canvas and store all K/V) every ``cache_refresh`` steps of a block,
            counted from its first step. Default None: only at a block's first step.
        cache_window: ``(before, after)`` ints >= 0 or None, approximate caches only
            (dInfer's vicinity refresh): each step also recomputes the K/V of ``before``
            positions before the block and (dual) ``after`` positions after it.
            Default None: ``(0, 0)``.

    DiffusionGemma models (``convention="diffusion_gemma"``, their default and only
    one; transformers' ``DiffusionGemmaGenerationMixin.generate``, rules in
    ``jmoe.sampling.entropy_bound``) take ``gen_length`` (transformers'
    ``max_new_tokens``; model, else 256; rounded up to whole canvases, all of which the
    output keeps), ``adaptive``, ``eos_id``, ``early_stop`` (the pad id after a row's
    first EOS, and the row stops), ``seed``, ``return_trace``, ``cache`` (None, True or
    ``"exact"``: always cached) and these; the other options are refused:
        canvas_length: int, positions denoised together (model's generation config,
            else its config's ``canvas_length``, else 256).
        max_denoising_steps: int, most steps per canvas. Model, else 48.
        entropy_bound: float > 0, a step accepts, in ascending entropy order, the
            positions whose running entropy without themselves is within it (at least
            one); the others are renoised with uniform tokens. Model (its
            ``sampler_config.entropy_bound``), else 0.1.
        t_min, t_max: floats >= 0, ``t_max > t_min``: the temperature of step
            ``n = N .. 1`` is ``t_min + (t_max - t_min) n / N``. Model, else 0.4, 0.8.
        stability_threshold: int >= 0, a row stops when its argmax canvas equals the
            previous ``stability_threshold`` steps' and ... Model, else 1.
        confidence_threshold: float > 0, ... the mean entropy of its tempered logits is
            below this. Model, else 0.005.
    ``adaptive`` budgets grow with each position's renoise count (``remask_count``),
    and block expert sets apply per canvas.

    Returns:
        ``GenerateOutput``: tokens ``[B, max P + G]`` (left-padded with the pad id),
        texts, nfe, experts_per_token, remask_count, expert_work, trace, expert_reads,
        block_steps (per row and block: the calls it took part in; steps per canvas).

    Raises:
        ValueError: prompts an empty list, of the wrong type, token ids not integers
            (the message names the dtype or value) or outside the vocabulary, or
            strings without a tokenizer; a length not a positive int (a float, even
            6.0, included), ``gen_length`` not a multiple of ``block_length`` or
            ``steps`` not a multiple of the number of blocks (llada); prompt +
            ``gen_length`` past ``max_position_embeddings``; ``temperature`` or
            ``cfg_scale`` negative, inf or nan; ``seed`` not an int in [0, 2**64);
            ``remasking``, ``threshold_floor`` or ``convention`` not a known name;
            ``threshold`` outside (0, 1] (nan too); ``decoder`` not a known name, a
            decoder's option given to another decoder, ``threshold`` with
            ``decoder="fixed"``, ``low_threshold``/``edit_threshold``/``credit_decay``
            outside [0, 1], ``credit_alpha``/``credit_boost`` negative,
            ``max_post_steps`` not an int >= 0, ``remasking="random"`` with credit,
            hierarchy or joint, ``top_k`` not a positive int,
            ``top_p`` outside (0, 1]; ``adaptive`` not an ``AdaptiveExperts`` or its
            maximum above ``num_experts``; no mask token; a mask or EOS id not an int
            in the vocabulary; llada2 on a causal model (``causal=True``); ``cache=True``
            with llada or with expert-choice routing; ``cache`` not one of the five
            values; ``"prefix"``/``"dual"`` with llada2, a model whose attention is not
            bidirectional, or expert-choice routing (each expert picks among the whole
            sequence, which a call on part of the canvas does not see); ``cache_refresh``
            not a positive int or ``cache_window`` not two ints >= 0, or either without
            an approximate cache; under diffusion_gemma an option of the mask-based
            conventions, ``canvas_length``/``max_denoising_steps`` not positive ints,
            ``stability_threshold`` not an int >= 0, ``entropy_bound`` or
            ``confidence_threshold`` not > 0, ``t_min``/``t_max`` negative or ``t_max <=
            t_min``; a diffusion_gemma option under another convention.

    Example:
        out = jmoe.generate(model, ["Hello", "Hi"], gen_length=64, block_length=32,
                            adaptive=jmoe.AdaptiveExperts(growth="linear", maximum=8))
        print(out.texts, out.nfe, out.expert_work)
    """
    config = platform_lib.resolve(model.config, model.params)  # kernels for its devices
    opts, knobs = resolve_options(
        config, gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, threshold=threshold,
        threshold_floor=threshold_floor, adaptive=adaptive, mask_id=mask_id, eos_id=eos_id,
        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf,
        early_stop=early_stop, return_trace=return_trace, convention=convention, cache=cache,
        cache_refresh=cache_refresh, cache_window=cache_window,
        decoder=decoder, low_threshold=low_threshold, edit_threshold=edit_threshold,
        max_post_steps=max_post_steps, credit_alpha=credit_alpha, credit_boost=credit_boost,
        credit_decay=credit_decay, top_k=top_k, top_p=top_p, canvas_length=canvas_length,
        max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
        t_max=t_max, stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold)
    key = random_key(seed)
    rows = _encode(model, prompts)
    _check_tokens(rows, config.vocab_size)
    canvas = opts.convention.layout(rows, opts, config)
    s = loop.run(model.params, jnp.asarray(canvas.tokens_BL), jnp.asarray(canvas.valid_BL),
                 jnp.asarray(canvas.prompt_BL), key, knobs,
                 config=canvas.config, opts=canvas.opts)
    return opts.convention.output(model, s, canvas)
