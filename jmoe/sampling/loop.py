"""The compiled sampler: a ``step`` function and one ``lax.while_loop`` over all blocks.

Shape letters: B batch, L internal sequence (a bucketed prompt region of P_b
positions, then G generated ones), G generated positions, V vocab, S model calls
(trace length). Diffusion terms: *mask* (the mask token on a position not yet
generated), *block* (``block_length`` generated positions decoded together),
*step* (one model call), *commit* (write a sampled token for good), *remask*
(a masked position left masked by a step), *budget* (experts per token).

The step composes small strategies picked once at trace time from the static
options: a sampler (greedy or Gumbel), a confidence (remasking rule), and from the
convention (``opts.convention``, see ``conventions.py``) the commit count, the block
end, the rows a step computes, the reach of an uncached call and when a row is done;
then a budget update. Every model call goes through ``model_call.call_model``.

Cached runs (``opts.cached``, block-causal conventions): L is a canvas of whole aligned
blocks and the carry holds a K/V cache over it (``model_call.new_cache``; ``2B`` rows
with guidance: the prompt-masked copies second). The blocks before G are written once
before the loop (``prefill``), each step runs the model on the current block only
(``block_call``: queries = block, keys = cache + block), and a finished block is run
once more with its final tokens to store its K/V (``_finish_block``). Block-causal
attention makes this exact: a block's keys/values never depend on later blocks.

Encoder-decoder conventions (``Convention.encoder_decoder``: diffusion_gemma) run the
cached path with the model's other contract (``model_call.cached_call``): the prefill
and each finished block's fill are ``encode_call`` (causal, writes K/V), a step's call
is ``denoise_call`` (reads only) with the decoder's extra inputs
(``Decoder.model_inputs``: self-conditioning logits). Their rules ride on the generic
decoder hooks the step calls for every convention: ``candidates`` (positions a step
decodes: masked ones, or a whole canvas for uniform noise), ``sample`` (logits to
tokens and confidences), ``select`` (commits and edits: a renoise is an edit to a
fresh token, so "left uncommitted" is the renoise count that grows budgets),
``block_over`` and ``block_tokens`` (the argmax canvas kept at a canvas's end); the
convention draws the starting canvas (``initial_tokens``). The carry gained only a
per-row count of calls per block (``block_calls_BN``); the self-conditioning buffer
and stop state are the decoder's own carry.

Approximate caches (``opts.approx_cache``, bidirectional models under llada: Fast-dLLM's
``"prefix"`` and ``"dual"`` caches): the carry holds K/V of the whole canvas
(``model_call.new_bidirectional_cache``), written by *refresh* steps that run the whole
canvas (a block's first step, and every ``cache_refresh``-th); the other steps run a
fixed-size window around the block and read every other key from the cache
(``approx_call``).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jmoe import xla_options
from jmoe.sampling import budgets as budgets_lib
from jmoe.sampling import decoders
from jmoe.sampling import model_call
from jmoe.sampling import remasking as rm
from jmoe.sampling import schedules
from jmoe.sampling.model_call import call_model, new_bidirectional_cache, num_moe_layers
from jmoe.sampling.state import SamplerOptions, SamplerState


def _guided_batch(tokens_BL, valid_BL, prompt_BL, budget_BL, opts: SamplerOptions):
    """With guidance the batch doubles: the rows, then copies with the prompt masked."""
    if not opts.guided:
        return tokens_BL, valid_BL, budget_BL
    twice = lambda a: jnp.concatenate([a, a])
    uncond_BL = jnp.where(prompt_BL, opts.mask_id, tokens_BL)
    return jnp.concatenate([tokens_BL, uncond_BL]), twice(valid_BL), twice(budget_BL)


def _guide(logits, cfg_scale, opts: SamplerOptions):
    """Combine the halves of a guided call: ``un + (cfg_scale + 1) * (cond - un)``."""
    if not opts.guided:
        return logits
    b = logits.shape[0] // 2
    cond, un = logits[:b], logits[b:]
    return un + (cfg_scale + 1.0) * (cond - un)


def model_logits(params, tokens_BL, valid_BL, prompt_BL, budget_BL, cfg_scale, *, config,
                 opts: SamplerOptions, sets=(None, None)):
    """Logits of the generated region ``[B, G, V]`` and the call's routed pairs.

    With guidance both halves (the prompt masked in the second) go through one
    model call: ``un + (cfg_scale + 1) * (cond - un)``.
    """
    tokens_BL, valid_BL, budget_BL = _guided_batch(tokens_BL, valid_BL, prompt_BL, budget_BL,
                                                   opts)
    logits, pairs, _, used = call_model(params, tokens_BL, valid_BL, budget_BL, config=config,
                                        opts=opts, expert_set=sets[0], refresh_set=sets[1])
    return _guide(logits[:, -opts.gen_length:], cfg_scale, opts), pairs, used


def block_call(params, tokens_BL, valid_BL, prompt_BL, budget_BL, rows_B, cache, block,
               cfg_scale, *, config, opts: SamplerOptions, sets=(None, None), write=True,
               extra=None):
    """Cached: run the model on block ``block`` only, keys = cache + block.

    Only ``rows_B`` are computed (the others are invalid tokens: no expert work, their
    logits and K/V are garbage). With guidance the cache holds ``2B`` rows, the
    unconditional copies second. Returns logits ``[B, block_length, V]``, the call's
    routed pairs and the K/V buffers with this block's keys/values written in.
    ``write`` says whether the call stores K/V (a step's call: False, a finished block's
    fill: True) and ``extra`` holds the decoder's extra inputs (``Decoder.model_inputs``);
    ``model_call.cached_call`` picks the model's calls from them.
    """
    bl, l = opts.block_length, tokens_BL.shape[1]
    p0 = l - opts.gen_length + block * bl  # absolute position of the block's start
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, p0, bl, axis=1)
    valid_BK = cut(valid_BL) & rows_B[:, None]
    tok_BK, valid_BK, budget_BK = _guided_batch(cut(tokens_BL), valid_BK, cut(prompt_BL),
                                                cut(budget_BL), opts)
    logits, pairs, cache, used = model_call.cached_call(
        params, tok_BK, valid_BK, budget_BK, config=config, opts=opts, cache=cache, offset=p0,
        expert_set=sets[0], refresh_set=sets[1], write=write, extra=extra)
    return _guide(logits, cfg_scale, opts), pairs, cache, used


def window_length(opts: SamplerOptions, l: int) -> int:
    """Approximate caches: the static length W of a non-refresh call on a canvas of
    ``l``: prefix ``G + before`` (the block, everything after it and ``before``),
    dual ``block_length + before + after``; at most ``l``."""
    before, after = opts.cache_window
    if opts.approx_cache == "prefix":
        return min(opts.gen_length + before, l)
    return min(opts.block_length + before + after, l)


def approx_call(params, tokens_BL, valid_BL, prompt_BL, budget_BL, rows_B, cache, block, step,
                cfg_scale, *, config, opts: SamplerOptions, sets=(None, None)):
    """Approximate caches (Fast-dLLM's prefix and dual caches, dInfer's vicinity window):
    logits ``[B, block_length, V]`` of block ``block``, the call's work (routed pairs,
    expert reads), the cache and the block expert sets the call used (``sets`` as in
    ``block_call``).

    A *refresh* step (the block's first, and with ``cache_refresh=n`` every n-th step of
    the block) runs the whole canvas as the uncached call does, uses its logits and
    stores every position's K/V. Any other step runs a window of ``window_length``
    positions: its *fresh* positions, ``[p0 - before, end)`` with ``p0`` the block's
    start and ``end`` the canvas end (prefix) or the block's end + ``after`` (dual),
    are computed (routed, K/V recomputed); every other key comes from the cache. The
    window's K/V are not stored: they are recomputed at every step until the next
    refresh overwrites them all, so storing them would change nothing. The window is
    clamped inside the canvas (its extra positions are not fresh: no expert work).
    """
    bl, l, g = opts.block_length, tokens_BL.shape[1], opts.gen_length
    before, after = opts.cache_window
    p0 = l - g + block * bl  # absolute position of the block's start
    call_valid_BL = opts.convention.reach(valid_BL & rows_B[:, None], block, opts)
    n = opts.cache_refresh
    refresh = (step == 0) if n is None else (step % n == 0)
    block_of = lambda logits, at: jax.lax.dynamic_slice_in_dim(logits, at, bl, axis=1)

    def full(cache):
        tok, val, bud = _guided_batch(tokens_BL, call_valid_BL, prompt_BL, budget_BL, opts)
        logits, pairs, cache, used = call_model(params, tok, val, bud, config=config,
                                                opts=opts, cache=cache, offset=0,
                                                expert_set=sets[0], refresh_set=sets[1])
        return block_of(logits, p0), pairs, cache, used

    def window(cache):
        w = window_length(opts, l)
        start = jnp.clip(p0 - before, 0, l - w)
        end = l if opts.approx_cache == "prefix" else p0 + bl + after
        cols_W = start + jnp.arange(w)
        fresh_W = (cols_W >= p0 - before) & (cols_W < end)
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, w, axis=1)
        tok, val, bud = _guided_batch(cut(tokens_BL), cut(call_valid_BL) & fresh_W,
                                      cut(prompt_BL), cut(budget_BL), opts)
        logits, pairs, _, used = call_model(params, tok, val, bud, config=config, opts=opts,
                                            cache=cache, offset=start,
                                            expert_set=sets[0], refresh_set=sets[1])
        return block_of(logits, p0 - start), pairs, cache, used

    logits, pairs, cache, used = jax.lax.cond(refresh, full, window, cache)
    return _guide(logits, cfg_scale, opts), pairs, cache, used


def prefill(params, tokens_BL, valid_BL, prompt_BL, budget_BL, cache, *, config,
            opts: SamplerOptions):
    """Cached: K/V of the canvas before the generated region (llada2: whole prompt
    blocks of every row, all valid; with guidance also of the prompt-masked copies;
    diffusion_gemma: the left-padded prompts, padding invalid)."""
    p = tokens_BL.shape[1] - opts.gen_length
    tok_BP, valid_BP, budget_BP = _guided_batch(
        tokens_BL[:, :p], valid_BL[:, :p], prompt_BL[:, :p], budget_BL[:, :p], opts)
    _, pairs, cache, _ = model_call.cached_call(params, tok_BP, valid_BP, budget_BP,
                                                config=config, opts=opts, cache=cache, offset=0,
                                                write=True)
    return cache, pairs


def _early_stop(opts: SamplerOptions, gen_BG, active_B, block, fixed_BG):
    """At a block's end: rows with a committed EOS stop; their later positions become EOS.

    ``fixed_BG`` positions never count: prompts (llada2's first generated block may hold
    the prompt's tail) and llada2's padding after a shorter row's canvas.
    """
    if not opts.early_stop or opts.eos_id is None:
        return gen_BG, active_B
    upto_G = schedules.before_block_end_G(block, opts.block_length, opts.gen_length)
    stop_B = active_B & ((gen_BG == opts.eos_id) & upto_G & ~fixed_BG).any(-1)
    if opts.mask_id is None:  # no mask token (uniform noise): the output cuts at EOS
        return gen_BG, active_B & ~stop_B
    fill = stop_B[:, None] & (gen_BG == opts.mask_id)
    return jnp.where(fill, opts.eos_id, gen_BG), active_B & ~stop_B


def _record(trace, nfe, committed_BG, budget_BG, remask_BG, block):
    put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), nfe, 0)
    return {"committed_SBG": put(trace["committed_SBG"], committed_BG),
            "budget_SBG": put(trace["budget_SBG"], budget_BG),
            "remask_SBG": put(trace["remask_SBG"], remask_BG),
            "block_S": put(trace["block_S"], block)}


def _sample(logits, positions_G, nfe, key, knobs, opts: SamplerOptions, carry=None,
            cand_BK=None, step=0):
    """Sampled tokens, confidences of the logits' positions (``positions_G``: their
    generated-region indices, which key the random stream) and the decoder's carry
    (``Decoder.sample``: filters, fusion, confidence rule)."""
    noise_keys, rand_keys = rm.step_keys(key, nfe, logits.shape[0], positions_G)
    return decoders.of(opts).sample(logits, noise_keys, rand_keys, knobs, opts, carry, cand_BK,
                                    step)


def _predict(s: SamplerState, params, valid_BL, prompt_BL, rows_B, key, knobs, *, cand_BG,
             config, opts: SamplerOptions):
    """Sampled tokens, confidences ``[B, G]`` (the current block's; -inf elsewhere), the
    call's work ``(work [2], carried sets)`` (routed pairs and expert reads; the block
    expert sets to carry under first_step) and the carry: the decoder's, and with an
    approximate cache ``(decoder carry, cache)`` (the cache written by a refresh step);
    only ``rows_B`` are computed."""
    g, b, bl = opts.gen_length, s.tokens_BL.shape[0], opts.block_length
    at = s.block * bl
    cache = s.cache
    # first_step block sets: picked at the block's first call, then the carried ones
    sets = (s.expert_set, s.step == 0)
    if opts.approx_cache:
        logits, pairs, cache, used = approx_call(
            params, s.tokens_BL, valid_BL, prompt_BL, s.budget_BL, rows_B, s.cache, s.block,
            s.step, knobs["cfg_scale"], config=config, opts=opts, sets=sets)
    elif opts.cached:
        # the step's K/V are dropped: a block's final K/V are stored once, when it ends
        logits, pairs, _, used = block_call(
            params, s.tokens_BL, valid_BL, prompt_BL, s.budget_BL, rows_B, s.cache, s.block,
            knobs["cfg_scale"], config=config, opts=opts, sets=sets, write=False,
            extra=decoders.of(opts).model_inputs(s.decoder, s.step))
    else:
        call_valid_BL = valid_BL & rows_B[:, None]  # stopped rows cost no expert work
        call_valid_BL = opts.convention.reach(call_valid_BL, s.block, opts)
        logits, pairs, used = model_logits(params, s.tokens_BL, call_valid_BL, prompt_BL,
                                           s.budget_BL, knobs["cfg_scale"], config=config,
                                           opts=opts, sets=sets)
        # only the block is sampled: per-position keys draw what the whole region would
        logits = jax.lax.dynamic_slice_in_dim(logits, at, bl, axis=1)
    cand_BK = jax.lax.dynamic_slice_in_dim(cand_BG, at, bl, axis=1)
    x0_BK, conf_BK, carry = _sample(logits, at + jnp.arange(bl), s.nfe, key, knobs, opts,
                                    s.decoder, cand_BK, s.step)
    x0_BG = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, g), jnp.int32), x0_BK, at, 1)
    conf_BG = jax.lax.dynamic_update_slice_in_dim(
        jnp.full((b, g), -jnp.inf, jnp.float32), conf_BK, at, 1)
    return (x0_BG, conf_BG, (pairs, _carried(used, s)),
            (carry, cache) if opts.approx_cache else carry)


def _carried(used, s: SamplerState):
    """The sets to carry (first_step), else a placeholder of no size."""
    return used if s.expert_set is not None else jnp.zeros((0,), bool)


def _call(s: SamplerState, params, valid_BL, prompt_BL, cand_BG, calls_BG, key, knobs, *,
          config, opts: SamplerOptions):
    """The step's model call: ``(x0_BG, conf_BG, (work, sets), decoder carry, called,
    cache)`` (``work``: routed pairs and expert reads; ``sets``: the block expert sets the
    call used, under first_step);
    the convention picks the rows it computes (``gate_call``: rows with a position in
    ``calls_BG``) and whether it is made at all. The cache is the approximate caches'
    after a refresh, else ``s.cache``."""
    predict = partial(_predict, s, params, valid_BL, prompt_BL, key=key, knobs=knobs,
                      cand_BG=cand_BG, config=config, opts=opts)
    carry = (s.decoder, s.cache) if opts.approx_cache else s.decoder
    x0_BG, conf_BG, work, carry, called = opts.convention.gate_call(predict, calls_BG,
                                                                    s.active_B, carry)
    if opts.approx_cache:
        return x0_BG, conf_BG, work, carry[0], called, carry[1]
    return x0_BG, conf_BG, work, carry, called, s.cache


def _finish_block(s: SamplerState, params, over, rows_B, tokens_BL, valid_BL, prompt_BL,
                  budget_BL, cfg_scale, *, config, opts: SamplerOptions,
                  refresh_set=jnp.bool_(False)):
    """Cached: at a block's end, K/V of its final tokens go into the cache once,
    for the rows that go on (``rows_B``) and have real tokens there (prompt-only
    blocks included); the others' are never read. First_step sets: ``s.expert_set``
    (the block's), or picked anew where ``refresh_set`` (a block that made no call)."""
    if not opts.cached:
        return s.cache, jnp.zeros((2,), jnp.int32)

    def fill(cache):
        _, pairs, cache, _ = block_call(params, tokens_BL, valid_BL, prompt_BL, budget_BL,
                                        rows_B, cache, s.block, cfg_scale, config=config,
                                        opts=opts, sets=(s.expert_set, refresh_set))
        return cache, pairs

    return jax.lax.cond(over & rows_B.any(), fill, lambda c: (c, jnp.zeros((2,), jnp.int32)),
                        s.cache)


def step(s: SamplerState, params, valid_BL, prompt_BL, key, knobs, *, config,
         opts: SamplerOptions) -> SamplerState:
    """One model call and its commits, budget update and block bookkeeping."""
    g = opts.gen_length
    decoder = decoders.of(opts)
    gen_BG = s.tokens_BL[:, -g:]
    window_G = schedules.block_window_G(s.block, opts.block_length, g)
    cand_BG = decoder.candidates(gen_BG, window_G, s.active_B, s.decoder, opts)
    fixed_BG = prompt_BL[:, -g:] | ~valid_BL[:, -g:]
    sched = schedules.schedule_count(opts.block_length, opts.steps_per_block, s.step)
    seen = decoders.Step(x0=None, conf=None, cand=cand_BG, gen=gen_BG, window=window_G,
                         fixed=fixed_BG, sched=jnp.full(cand_BG.shape[:1], sched, jnp.int32),
                         active=s.active_B)
    calls_BG = decoder.call_rows(seen, s.decoder)
    x0_BG, conf_BG, (pairs, used), carry, called, cache = _call(
        s, params, valid_BL, prompt_BL, cand_BG, calls_BG, key, knobs, config=config, opts=opts)
    s = s.replace(cache=cache)
    expert_set = s.expert_set
    if expert_set is not None:
        expert_set = jnp.where(called, used, expert_set)

    commit_BG, edit_BG, carry = decoder.select(
        dataclasses.replace(seen, x0=x0_BG, conf=conf_BG), knobs, opts, carry)
    gen_BG = jnp.where(commit_BG | edit_BG, x0_BG, gen_BG)
    still_BG = cand_BG & ~commit_BG

    nfe = s.nfe + called.astype(jnp.int32)
    budget_BG, remask_BG = s.budget_BL[:, -g:], s.remask_BG
    if opts.adaptive:  # without a call nothing is still masked: no growth
        budget_BG, remask_BG = budgets_lib.update_budgets(opts.adaptive, nfe, budget_BG,
                                                          remask_BG, still_BG)
    trace = s.trace
    if opts.return_trace:
        new = _record(trace, s.nfe, commit_BG | edit_BG, s.budget_BL[:, -g:], remask_BG,
                      s.block)
        trace = jax.tree.map(lambda n, o: jnp.where(called, n, o), new, trace)

    over = decoder.block_over(opts, s.step, still_BG, carry)
    gen_BG = decoder.block_tokens(gen_BG, window_G, over, s.active_B, carry)
    tokens_BL = s.tokens_BL.at[:, -g:].set(gen_BG)
    budget_BL = s.budget_BL.at[:, -g:].set(budget_BG)
    stopped_gen_BG, stopped_active_B = _early_stop(opts, gen_BG, s.active_B, s.block, fixed_BG)
    stopped_active_B = opts.convention.rows_done(stopped_gen_BG, stopped_active_B, opts)
    # the fill uses the sets of the block's first call (this step's when the block ends at
    # its first step); a block without any call (llada2: no row has a mask there) picks its
    # own from the fill's tokens
    cache, fill_pairs = _finish_block(s.replace(expert_set=expert_set), params, over,
                                      stopped_active_B, tokens_BL, valid_BL, prompt_BL,
                                      budget_BL, knobs["cfg_scale"], config=config, opts=opts,
                                      refresh_set=~called & (s.step == 0))
    gen_BG = jnp.where(over, stopped_gen_BG, gen_BG)
    active_B = jnp.where(over, stopped_active_B, s.active_B)
    # a call-less step (an empty block) books its block fill on the previous call
    slot = jnp.where(called, s.nfe, jnp.maximum(s.nfe - 1, 0))
    return SamplerState(
        tokens_BL=tokens_BL.at[:, -g:].set(gen_BG), budget_BL=budget_BL,
        remask_BG=remask_BG, active_B=active_B,
        block=s.block + over.astype(jnp.int32),
        step=jnp.where(over, 0, s.step + 1),
        nfe=nfe, work_S=s.work_S.at[slot].add(pairs + fill_pairs), trace=trace,
        block_calls_BN=s.block_calls_BN.at[:, s.block].add(
            (called & calls_BG.any(-1)).astype(jnp.int32)),
        decoder=decoder.reset(carry, over), cache=cache, expert_set=expert_set)


def initial_state(tokens_BL, prompt_region_BL, *, config, opts: SamplerOptions,
                  params=None, valid_BL=None) -> SamplerState:
    b, _ = tokens_BL.shape
    g, n = opts.gen_length, opts.max_calls
    if opts.adaptive:
        budget_BL = budgets_lib.initial_budgets_BL(opts.adaptive, prompt_region_BL)
    else:
        budget_BL = jnp.full(tokens_BL.shape, config.num_experts_per_tok, jnp.int32)
    trace = None
    if opts.return_trace:
        trace = {"committed_SBG": jnp.zeros((n, b, g), bool),
                 "budget_SBG": jnp.zeros((n, b, g), jnp.int32),
                 "remask_SBG": jnp.zeros((n, b, g), jnp.int32),
                 "block_S": jnp.zeros((n,), jnp.int32)}
    zero = jnp.zeros((), jnp.int32)
    work_S = jnp.zeros((n, 2), jnp.int32)
    cache = None
    if opts.approx_cache:  # filled by each block's first step (a refresh)
        cache = new_bidirectional_cache(
            config, jnp.concatenate([valid_BL, valid_BL]) if opts.guided else valid_BL)
    if opts.cached:
        # guidance: the prompt-masked copies get their own K/V rows, after the B rows
        cache = model_call.new_block_cache(config, opts, 2 * b if opts.guided else b,
                                           tokens_BL.shape[1])
        if tokens_BL.shape[1] > g:  # the prompt region before the generated one
            cache, pairs = prefill(params, tokens_BL, valid_BL, prompt_region_BL, budget_BL,
                                   cache, config=config, opts=opts)
            work_S = work_S.at[0].add(pairs)
    carry = decoders.of(opts).init_carry(b, opts.block_length, config.vocab_size)
    expert_set = None
    ad = opts.adaptive
    if ad and ad.experts_per_block and ad.expert_set == "first_step":
        rows = 2 * b if opts.guided else b
        expert_set = jnp.zeros((num_moe_layers(config), rows, config.num_experts), bool)
    return SamplerState(tokens_BL=tokens_BL, budget_BL=budget_BL,
                        remask_BG=jnp.zeros((b, g), jnp.int32), active_B=jnp.ones((b,), bool),
                        block=zero, step=zero, nfe=zero, work_S=work_S, trace=trace,
                        block_calls_BN=jnp.zeros((b, opts.num_blocks), jnp.int32),
                        decoder=carry, cache=cache, expert_set=expert_set)


@xla_options.jit(static_argnames=("config", "opts"))
def run(params, tokens_BL, valid_BL, prompt_BL, key, knobs, *, config,
        opts: SamplerOptions) -> SamplerState:
    """The whole generation, all blocks and steps, as one compiled ``lax.while_loop``.

    ``tokens_BL``, ``valid_BL`` (real tokens) and ``prompt_BL`` (real prompt tokens) are
    the convention's canvas (``Convention.layout``): for llada the left-padded prompts
    then ``gen_length`` mask tokens, for llada2 each row's prompt from column 0, its
    masks, then padding.
    """
    # llada2's generated region may start with the prompt's tail: prompt budgets there too
    prompt_region_BL = (jnp.arange(tokens_BL.shape[1]) < tokens_BL.shape[1] - opts.gen_length
                        ) | prompt_BL
    # the uniform-noise convention starts every canvas from random tokens
    tokens_BL = opts.convention.initial_tokens(tokens_BL, key, config, opts)
    s0 = initial_state(tokens_BL, prompt_region_BL, config=config, opts=opts, params=params,
                       valid_BL=valid_BL)

    def cond(s):
        return (s.block < opts.num_blocks) & s.active_B.any() & (s.nfe < opts.max_calls)

    body = partial(step, params=params, valid_BL=valid_BL, prompt_BL=prompt_BL, key=key,
                   knobs=knobs, config=config, opts=opts)
    return jax.lax.while_loop(cond, body, s0)
