"""The compiled sampler: a ``step`` function and one ``lax.while_loop`` over all blocks.

Shape letters: B batch, L internal sequence (a bucketed prompt region of P_b
positions, then G generated ones), G generated positions, V vocab, S model calls
(trace length). Diffusion terms: *mask* (the mask token on a position not yet
generated), *block* (``block_length`` generated positions decoded together),
*step* (one model call), *commit* (write a sampled token for good), *remask*
(a masked position left masked by a step), *budget* (experts per token).

The step composes small strategies picked once at trace time from the static
options: a sampler (greedy or Gumbel), a confidence (remasking rule), a commit
count (fixed schedule or threshold), a block-end rule and a budget update.

LLaDA2 convention (``opts.convention == "llada2"``): L is the canvas of whole aligned
blocks, each row laid out from column 0 (position = column, padding on the right), and
the generated region G starts at the first block holding some row's prompt tail. A
step computes only the rows with a mask in the current block. With ``opts.cached`` the
carry holds K/V buffers ``[layers, B, L, N, K]`` (``2B`` with guidance: the
prompt-masked copies second): the blocks before G are written once before the loop
(``prefill``), each step runs the model on the current block only (``block_call``:
queries = block, keys = buffer + block), and a finished block is run once more with
its final tokens to store its K/V (``_finish_block``). Block-causal attention makes
this exact: a block's keys/values never depend on later blocks.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jmoe import xla_options
from jmoe.model import model_module
from jmoe.sampling import budgets as budgets_lib
from jmoe.sampling import remasking as rm
from jmoe.sampling import schedules
from jmoe.sampling.state import SamplerOptions, SamplerState


def _guided_batch(tokens_BL, valid_BL, prompt_BL, budget_BL, opts: SamplerOptions):
    """With guidance the batch doubles: the rows, then copies with the prompt masked."""
    if not opts.guided:
        return tokens_BL, valid_BL, budget_BL
    twice = lambda a: None if a is None else jnp.concatenate([a, a])
    uncond_BL = jnp.where(prompt_BL, opts.mask_id, tokens_BL)
    return jnp.concatenate([tokens_BL, uncond_BL]), twice(valid_BL), twice(budget_BL)


def _guide(logits, cfg_scale, opts: SamplerOptions):
    """Combine the halves of a guided call: ``un + (cfg_scale + 1) * (cond - un)``."""
    if not opts.guided:
        return logits
    b = logits.shape[0] // 2
    cond, un = logits[:b], logits[b:]
    return un + (cfg_scale + 1.0) * (cond - un)


def _k_max(config, opts: SamplerOptions):
    return opts.adaptive.maximum if opts.adaptive else config.num_experts_per_tok


def model_logits(params, tokens_BL, valid_BL, prompt_BL, budget_BL, cfg_scale, *, config,
                 opts: SamplerOptions):
    """Logits of the generated region ``[B, G, V]`` and the call's routed pairs.

    With guidance both halves (the prompt masked in the second) go through one
    model call: ``un + (cfg_scale + 1) * (cond - un)``.
    """
    tokens_BL, valid_BL, budget = _guided_batch(tokens_BL, valid_BL, prompt_BL,
                                                budget_BL if opts.adaptive else None, opts)
    logits, aux = model_module(config).apply({"params": params}, tokens_BL, valid_BL, budget,
                                             _k_max(config, opts))
    logits = _guide(logits[:, -opts.gen_length:], cfg_scale, opts)
    return logits, aux["routed_pairs"].sum().astype(jnp.int32)


def block_call(params, tokens_BL, valid_BL, prompt_BL, budget_BL, rows_B, cache, block,
               cfg_scale, *, config, opts: SamplerOptions):
    """Cached llada2: run the model on block ``block`` only, keys = cache + block.

    Only ``rows_B`` are computed (the others are invalid tokens: no expert work, their
    logits and K/V are garbage). With guidance the cache holds ``2B`` rows, the
    unconditional copies second. Returns logits ``[B, block_length, V]``, the call's
    routed pairs and the K/V buffers with this block's keys/values written in.
    """
    from jmoe.models.llada2 import LLaDA2Model

    bl, l = opts.block_length, tokens_BL.shape[1]
    p0 = l - opts.gen_length + block * bl  # absolute position of the block's start
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, p0, bl, axis=1)
    valid_BK = cut(valid_BL) & rows_B[:, None]
    tok_BK, valid_BK, budget = _guided_batch(cut(tokens_BL), valid_BK, cut(prompt_BL),
                                             cut(budget_BL) if opts.adaptive else None, opts)
    logits, aux, cache = LLaDA2Model(config).apply({"params": params}, tok_BK, valid_BK, budget,
                                                   _k_max(config, opts), cache=cache, offset=p0)
    return (_guide(logits, cfg_scale, opts), aux["routed_pairs"].sum().astype(jnp.int32),
            cache)


def prefill(params, tokens_BL, prompt_BL, budget_BL, cache, *, config, opts: SamplerOptions):
    """Cached llada2: K/V of the canvas blocks before the first generated one (whole prompt
    blocks of every row; with guidance also of the prompt-masked copies)."""
    from jmoe.models.llada2 import LLaDA2Model

    p = tokens_BL.shape[1] - opts.gen_length
    tok_BP, valid_BP, budget = _guided_batch(
        tokens_BL[:, :p], jnp.ones((tokens_BL.shape[0], p), bool), prompt_BL[:, :p],
        budget_BL[:, :p] if opts.adaptive else None, opts)
    _, aux, cache = LLaDA2Model(config).apply(
        {"params": params}, tok_BP, valid_BP, budget, _k_max(config, opts), cache=cache,
        offset=0)
    return cache, aux["routed_pairs"].sum().astype(jnp.int32)


def _strategies(opts: SamplerOptions):
    sample = rm.sample_gumbel if opts.sampled else rm.sample_greedy
    unconfident = (opts.eos_id,) if opts.confidence_eos_eot_inf else ()
    confidence = partial(rm.CONFIDENCES[opts.remasking], unconfident_ids=unconfident)
    count = rm.count_fixed
    if opts.thresholded:
        count = rm.count_threshold(opts.threshold_floor, strict=opts.convention == "llada2")
    return sample, confidence, count


def _block_over(opts: SamplerOptions, step, still_masked_BG):
    """Fixed steps: after ``steps_per_block`` calls; threshold: when no mask is left;
    llada2: whichever comes first."""
    spent = step + 1 >= opts.steps_per_block
    if opts.convention == "llada2":
        return spent | ~still_masked_BG.any()
    if opts.thresholded:
        return ~still_masked_BG.any()
    return spent


def _early_stop(opts: SamplerOptions, gen_BG, active_B, block, fixed_BG):
    """At a block's end: rows with a committed EOS stop; their later positions become EOS.

    ``fixed_BG`` positions never count: prompts (llada2's first block may hold the
    prompt's tail) and llada2's padding after a shorter row's canvas.
    """
    if not opts.early_stop or opts.eos_id is None:
        return gen_BG, active_B
    upto_G = schedules.before_block_end_G(block, opts.block_length, opts.gen_length)
    stop_B = active_B & ((gen_BG == opts.eos_id) & upto_G & ~fixed_BG).any(-1)
    fill = stop_B[:, None] & (gen_BG == opts.mask_id)
    return jnp.where(fill, opts.eos_id, gen_BG), active_B & ~stop_B


def _record(trace, nfe, committed_BG, budget_BG, remask_BG, block):
    put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), nfe, 0)
    return {"committed_SBG": put(trace["committed_SBG"], committed_BG),
            "budget_SBG": put(trace["budget_SBG"], budget_BG),
            "remask_SBG": put(trace["remask_SBG"], remask_BG),
            "block_S": put(trace["block_S"], block)}


def _sample(logits, positions_G, nfe, key, knobs, opts: SamplerOptions):
    """Sampled tokens and confidences of the logits' positions (``positions_G``: their
    generated-region indices, which key the random stream)."""
    sample, confidence, _ = _strategies(opts)
    # the mask token is never a prediction (so a block always empties; dInfer does the same)
    forbidden = (opts.mask_id,) + ((opts.eos_id,) if opts.logits_eos_inf else ())
    logits = rm.forbid_tokens(logits, forbidden)
    noise_keys, rand_keys = rm.step_keys(key, nfe, logits.shape[0], positions_G)
    x0 = sample(logits, knobs["temperature"], noise_keys)
    return x0, confidence(logits, x0, rand_keys).astype(jnp.float32)


def _predict(s: SamplerState, params, valid_BL, prompt_BL, rows_B, key, knobs, *, config,
             opts: SamplerOptions):
    """Sampled tokens, confidences ``[B, G]`` (only the current block matters) and the
    call's routed pairs; only ``rows_B`` are computed."""
    g, b = opts.gen_length, s.tokens_BL.shape[0]
    if opts.cached:
        # the step's K/V are dropped: a block's final K/V are stored once, when it ends
        logits, pairs, _ = block_call(params, s.tokens_BL, valid_BL, prompt_BL, s.budget_BL,
                                      rows_B, s.cache, s.block, knobs["cfg_scale"],
                                      config=config, opts=opts)
        at = s.block * opts.block_length
        x0_BK, conf_BK = _sample(logits, at + jnp.arange(opts.block_length), s.nfe, key, knobs,
                                 opts)
        x0_BG = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, g), jnp.int32), x0_BK, at, 1)
        conf_BG = jax.lax.dynamic_update_slice_in_dim(
            jnp.full((b, g), -jnp.inf, jnp.float32), conf_BK, at, 1)
        return x0_BG, conf_BG, pairs
    call_valid_BL = valid_BL & rows_B[:, None]  # stopped rows cost no expert work
    if opts.convention == "llada2":
        # block-causal: later blocks cannot change this block, so they are left out
        # (as the reference runs ``x[:, :window_end]``) and cost no expert work
        l = s.tokens_BL.shape[1]
        end = l - g + (s.block + 1) * opts.block_length
        call_valid_BL = call_valid_BL & (jnp.arange(l) < end)
    logits, pairs = model_logits(params, s.tokens_BL, call_valid_BL, prompt_BL, s.budget_BL,
                                 knobs["cfg_scale"], config=config, opts=opts)
    x0_BG, conf_BG = _sample(logits, jnp.arange(g), s.nfe, key, knobs, opts)
    return x0_BG, conf_BG, pairs


def _call(s: SamplerState, params, valid_BL, prompt_BL, cand_BG, key, knobs, *, config,
          opts: SamplerOptions):
    """The step's model call: ``(x0_BG, conf_BG, pairs, called)``.

    llada computes every active row. llada2 computes only the rows with a mask in the
    current block (with mixed prompt lengths the rows' regions start in different
    blocks; a row that emptied the block early waits), and a block where no row has
    one (between a short row's region and a long prompt's) makes no call at all.
    """
    predict = partial(_predict, s, params, valid_BL, prompt_BL, key=key, knobs=knobs,
                      config=config, opts=opts)
    if opts.convention != "llada2":
        return *predict(s.active_B), jnp.bool_(True)
    busy_B = cand_BG.any(-1)
    b, g = cand_BG.shape
    idle = lambda _: (jnp.zeros((b, g), jnp.int32), jnp.full((b, g), -jnp.inf, jnp.float32),
                      jnp.zeros((), jnp.int32))
    return *jax.lax.cond(busy_B.any(), predict, idle, busy_B), busy_B.any()


def _finish_block(s: SamplerState, params, over, rows_B, tokens_BL, valid_BL, prompt_BL,
                  budget_BL, cfg_scale, *, config, opts: SamplerOptions):
    """Cached llada2: at a block's end, K/V of its final tokens go into the cache once,
    for the rows that go on (``rows_B``) and have real tokens there (prompt-only
    blocks included); the others' are never read."""
    if not opts.cached:
        return s.cache, jnp.zeros((), jnp.int32)

    def fill(cache):
        _, pairs, cache = block_call(params, tokens_BL, valid_BL, prompt_BL, budget_BL, rows_B,
                                     cache, s.block, cfg_scale, config=config, opts=opts)
        return cache, pairs

    return jax.lax.cond(over & rows_B.any(), fill, lambda c: (c, jnp.zeros((), jnp.int32)),
                        s.cache)


def step(s: SamplerState, params, valid_BL, prompt_BL, key, knobs, *, config,
         opts: SamplerOptions) -> SamplerState:
    """One model call and its commits, budget update and block bookkeeping."""
    g = opts.gen_length
    _, _, count = _strategies(opts)
    gen_BG = s.tokens_BL[:, -g:]
    window_G = schedules.block_window_G(s.block, opts.block_length, g)
    cand_BG = (gen_BG == opts.mask_id) & window_G & s.active_B[:, None]
    x0_BG, conf_BG, pairs, called = _call(s, params, valid_BL, prompt_BL, cand_BG, key, knobs,
                                          config=config, opts=opts)

    sched = schedules.schedule_count(opts.block_length, opts.steps_per_block, s.step)
    n_B = count(conf_BG, cand_BG, jnp.full(cand_BG.shape[:1], sched, jnp.int32),
                knobs["threshold"])
    commit_BG = rm.commit_mask(conf_BG, cand_BG, n_B)
    gen_BG = jnp.where(commit_BG, x0_BG, gen_BG)
    still_BG = cand_BG & ~commit_BG

    nfe = s.nfe + called.astype(jnp.int32)
    budget_BG, remask_BG = s.budget_BL[:, -g:], s.remask_BG
    if opts.adaptive:  # without a call nothing is still masked: no growth
        budget_BG, remask_BG = budgets_lib.update_budgets(opts.adaptive, nfe, budget_BG,
                                                          remask_BG, still_BG)
    trace = s.trace
    if opts.return_trace:
        new = _record(trace, s.nfe, commit_BG, s.budget_BL[:, -g:], remask_BG, s.block)
        trace = jax.tree.map(lambda n, o: jnp.where(called, n, o), new, trace)

    over = _block_over(opts, s.step, still_BG)
    tokens_BL = s.tokens_BL.at[:, -g:].set(gen_BG)
    budget_BL = s.budget_BL.at[:, -g:].set(budget_BG)
    fixed_BG = prompt_BL[:, -g:] | ~valid_BL[:, -g:]
    stopped_gen_BG, stopped_active_B = _early_stop(opts, gen_BG, s.active_B, s.block, fixed_BG)
    if opts.convention == "llada2":  # a row with no mask left is done (regions end apart)
        stopped_active_B = stopped_active_B & (stopped_gen_BG == opts.mask_id).any(-1)
    cache, fill_pairs = _finish_block(s, params, over, stopped_active_B, tokens_BL, valid_BL,
                                      prompt_BL, budget_BL, knobs["cfg_scale"], config=config,
                                      opts=opts)
    gen_BG = jnp.where(over, stopped_gen_BG, gen_BG)
    active_B = jnp.where(over, stopped_active_B, s.active_B)
    # a call-less step (an empty block) books its block fill on the previous call
    slot = jnp.where(called, s.nfe, jnp.maximum(s.nfe - 1, 0))
    return SamplerState(
        tokens_BL=tokens_BL.at[:, -g:].set(gen_BG), budget_BL=budget_BL,
        remask_BG=remask_BG, active_B=active_B,
        block=s.block + over.astype(jnp.int32),
        step=jnp.where(over, 0, s.step + 1),
        nfe=nfe, work_S=s.work_S.at[slot].add(pairs + fill_pairs), trace=trace, cache=cache)


def initial_state(tokens_BL, prompt_region_BL, *, config, opts: SamplerOptions,
                  params=None) -> SamplerState:
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
    work_S = jnp.zeros((n,), jnp.int32)
    cache = None
    if opts.cached:
        from jmoe.models.llada2 import empty_kv_cache

        # guidance: the prompt-masked copies get their own K/V rows, after the B rows
        cache = empty_kv_cache(config, 2 * b if opts.guided else b, tokens_BL.shape[1])
        if tokens_BL.shape[1] > g:  # whole prompt blocks before the first generated one
            cache, pairs = prefill(params, tokens_BL, prompt_region_BL, budget_BL, cache,
                                   config=config, opts=opts)
            work_S = work_S.at[0].add(pairs)
    return SamplerState(tokens_BL=tokens_BL, budget_BL=budget_BL,
                        remask_BG=jnp.zeros((b, g), jnp.int32), active_B=jnp.ones((b,), bool),
                        block=zero, step=zero, nfe=zero, work_S=work_S, trace=trace, cache=cache)


@xla_options.jit(static_argnames=("config", "opts"))
def run(params, tokens_BL, valid_BL, prompt_BL, key, knobs, *, config,
        opts: SamplerOptions) -> SamplerState:
    """The whole generation, all blocks and steps, as one compiled ``lax.while_loop``.

    ``tokens_BL`` holds the left-padded prompts then ``gen_length`` mask tokens (llada2:
    each row's prompt from column 0, its masks, then padding); ``valid_BL`` marks real
    tokens; ``prompt_BL`` the real prompt tokens.
    """
    # llada2's generated region may start with the prompt's tail: prompt budgets there too
    prompt_region_BL = (jnp.arange(tokens_BL.shape[1]) < tokens_BL.shape[1] - opts.gen_length
                        ) | prompt_BL
    s0 = initial_state(tokens_BL, prompt_region_BL, config=config, opts=opts, params=params)

    def cond(s):
        return (s.block < opts.num_blocks) & s.active_B.any() & (s.nfe < opts.max_calls)

    body = partial(step, params=params, valid_BL=valid_BL, prompt_BL=prompt_BL, key=key,
                   knobs=knobs, config=config, opts=opts)
    return jax.lax.while_loop(cond, body, s0)
