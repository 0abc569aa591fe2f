"""A plain Python-loop reference of LLaDA generation, written from the spec.

SEEDS.md §3 (LLaDA ``generate``), §1 (adaptive budgets), the issue's threshold
and early-stop rules; block expert sets (issue 16): ``mass`` passes
``experts_per_block`` to every call, ``first_step`` gives the sets of a block's first
call back to its later calls. NumPy float64 for everything after the model call; one
``jmoe.forward`` per step on the batch left-padded to its longest prompt (no
bucketing). Only the random stream is shared with the library, as a documented
convention: call ``nfe`` uses ``split(fold_in(key(seed), nfe))`` -> (noise, rand)
keys, generated position ``g`` of row ``b`` draws the Gumbel noise from
``fold_in(fold_in(noise, b), g)`` and a random confidence ``uniform(fold_in(fold_in(rand,
b), g), [])`` in ``[float32 tiny, 1)``. The noise key's threefry hash of counters
``0 .. 2V-1`` gives 64 bits per token (words ``hi = w[:V]``, ``lo = w[V:]``); its top
bit picks a half of (0, 1), the other 63 bits ``m`` the distance from its end, ``t = (m +
1/2) 2^-64``, and ``u = t`` or ``1 - t``. The mask token is never predicted (its logit is
-inf).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.extend.random import threefry_2x32

import jmoe

TINY = float(np.finfo(np.float32).tiny)


def _uniform(key, shape):
    return np.asarray(jax.random.uniform(key, shape, minval=TINY, maxval=1.0), np.float64)


def _exponential(key, v):
    """``-log u`` of the 64-bit uniform of each of ``v`` tokens, in float64."""
    w = np.asarray(threefry_2x32(jax.random.key_data(key), np.arange(2 * v, dtype=np.uint32)))
    hi, lo = w[:v].astype(np.uint64), w[v:].astype(np.uint64)
    t = (((hi & 0x7FFFFFFF) << np.uint64(32)) | lo).astype(np.float64) * 2.0 ** -64 + 2.0 ** -65
    return np.where(hi >> np.uint64(31) == 1, -np.log1p(-t), -np.log(t))


def _position_draws(key, b, draw, positions):
    """Row ``b``'s draws ``draw(key)``, one key per generated position, stacked."""
    row = jax.random.fold_in(key, b)
    return np.stack([draw(jax.random.fold_in(row, g)) for g in positions])


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _grow(adaptive, r):
    k = adaptive.initial + r if adaptive.growth == "linear" else adaptive.initial * 2 ** r
    return min(k, adaptive.maximum)


def _schedule(n, steps, i):
    if i >= steps:
        return n
    return n // steps + (1 if i < n % steps else 0)


def filter_keep(lg, temperature, top_k=None, top_p=None):
    """LLaDA2's ``_sample_with_temperature_topk_topp`` filters on ``[G, V]`` float64
    logits: keep the top_k largest (ties at the k-th kept), then the nucleus of
    ``softmax(l / T)``: sorted (stable) tokens until the mass before one exceeds top_p."""
    keep = np.ones(lg.shape, bool)
    if top_k is not None:
        kth = np.sort(lg, -1)[:, -top_k][:, None]
        keep &= lg >= kth
    if top_p is not None:
        for g in range(lg.shape[0]):
            sc = np.where(keep[g], lg[g] / temperature, -np.inf)
            order = np.argsort(-sc, kind="stable")
            p = _softmax(sc[order][None])[0]
            before = np.concatenate([[0.0], np.cumsum(p)[:-1]])  # mass before each token
            keep[g, order[(before > top_p) & (np.arange(len(p)) > 0)]] = False
    return keep


def credit_fuse(lg, credit, cand, alpha, boost, decay):
    """dInfer's ``_apply_credit_fusion`` on one row's block: ``credit [K, V]`` decayed,
    the top-1 token of each candidate boosted by ``p_top1 ** boost``; returns
    ``(fused logits, credit)``."""
    p = _softmax(lg)
    top = p.argmax(-1)
    credit = credit * decay
    for k in np.nonzero(cand)[0]:
        credit[k, top[k]] += p[k, top[k]] ** boost
    return lg + alpha * np.log(credit + 1.0), credit


def hierarchy_select(conf, cand, threshold, low_threshold):
    """dInfer's ``HierarchyDecoder`` on one row: each contiguous run of candidates commits
    its maximum (all tied maxima) if ``> low_threshold``; any candidate ``> threshold``;
    always the most confident one (lowest index among ties)."""
    out = np.zeros(cand.shape, bool)
    g = 0
    while g < len(cand):
        if cand[g]:
            e = g
            while e < len(cand) and cand[e]:
                e += 1
            m = conf[g:e].max()
            out[g:e] = (conf[g:e] == m) & (m > low_threshold)
            g = e
        else:
            g += 1
    if threshold is not None:
        out |= cand & (conf > threshold)
    if cand.any():
        out[np.argmax(np.where(cand, conf, -np.inf))] = True
    return out & cand


def _forward_with_sets(model, tokens, valid, budget, k_max, m, sets):
    """``jmoe.model.apply`` with given block expert sets ``[n_moe, B, E]``."""
    import jax.numpy as jnp

    from jmoe.model import apply
    from jmoe.routing import Budget

    b = Budget(jnp.asarray(budget, jnp.int32), k_max, experts_per_block=m,
               expert_set=jnp.asarray(sets))
    logits, aux, _ = apply(model.config, model.params, jnp.asarray(tokens, jnp.int32),
                           valid_BL=jnp.asarray(valid), budgets=b)
    return logits, aux


def reference_generate(model, rows, *, gen_length, block_length, steps, temperature=0.0,
                       cfg_scale=0.0, remasking="low_confidence", threshold=None,
                       threshold_floor="one", adaptive=None, mask_id, eos_id=None,
                       logits_eos_inf=False, confidence_eos_eot_inf=False, early_stop=True,
                       seed=0, pad_id=0, decoder=None, low_threshold=0.4, credit_alpha=0.7,
                       credit_boost=0.2, credit_decay=0.8, top_k=None, top_p=None):
    """``decoder``: None (fixed schedule, or threshold), ``"credit"`` or ``"hierarchy"``
    (dInfer's, both run a block until it has no mask)."""
    until_empty = threshold is not None or decoder in ("credit", "hierarchy")
    cfg = model.config
    B, P, G = len(rows), max(len(r) for r in rows), gen_length
    x = np.full((B, P + G), pad_id, np.int64)
    valid = np.zeros((B, P + G), bool)
    x[:, P:] = mask_id
    valid[:, P:] = True
    for b, r in enumerate(rows):
        x[b, P - len(r):P] = r
        valid[b, P - len(r):P] = True
    prompt = valid.copy()
    prompt[:, P:] = False
    k_max = adaptive.maximum if adaptive else cfg.num_experts_per_tok
    budget = np.full((B, P + G), k_max, np.int64)
    if adaptive:
        budget[:, P:] = adaptive.initial
    remask = np.zeros((B, G), np.int64)
    active = np.ones(B, bool)
    key = jax.random.key(seed)
    nfe, work = 0, 0
    trace = {"committed": [], "experts_per_token": [], "remask_count": [], "block": []}
    num_blocks = G // block_length
    spb = steps // num_blocks
    for blk in range(num_blocks):
        if not active.any():
            break
        credit = np.zeros((B, block_length, cfg.vocab_size))
        lo, hi = blk * block_length, (blk + 1) * block_length  # in generated coordinates
        i = 0
        while True:
            cand = np.zeros((B, G), bool)
            cand[:, lo:hi] = x[:, P + lo:P + hi] == mask_id
            cand &= active[:, None]
            if not until_empty and i == spb:
                break
            if until_empty and not cand.any():
                break
            call_valid = valid & active[:, None]
            xs, vs, bs = x, call_valid, budget
            if cfg_scale > 0:
                un = np.where(prompt, mask_id, x)
                xs, vs, bs = (np.concatenate([x, un]), np.concatenate([call_valid] * 2),
                              np.concatenate([budget] * 2))
            m = adaptive.experts_per_block if adaptive else None
            if m is not None and adaptive.expert_set == "first_step" and i > 0:
                # the block's sets, picked at its first call, given back
                logits, aux = _forward_with_sets(model, xs, vs, bs, k_max, m, block_sets)
            else:
                logits, aux = jmoe.forward(model, xs, attention_mask=vs,
                                           experts_per_token=bs if adaptive else None,
                                           max_experts=k_max if adaptive else None,
                                           experts_per_block=m)
            if m is not None:
                block_sets = np.asarray(aux["expert_set"])
                trace.setdefault("expert_set", []).append(block_sets)
                trace.setdefault("distinct_experts", []).append(
                    np.asarray(aux["distinct_experts"]))
            work += int(aux["routed_pairs"])
            logits = np.asarray(logits, np.float64)[:, P:]
            if cfg_scale > 0:
                cond, unc = logits[:B], logits[B:]
                logits = unc + (cfg_scale + 1) * (cond - unc)
            logits[..., mask_id] = -np.inf
            if logits_eos_inf:
                logits[..., eos_id] = -np.inf
            k_noise, k_rand = jax.random.split(jax.random.fold_in(key, nfe))
            committed = np.zeros((B, G), bool)
            for b in range(B):
                lg = logits[b]
                if decoder == "credit" and cand[b].any():
                    lg = lg.copy()
                    lg[lo:hi], credit[b] = credit_fuse(lg[lo:hi], credit[b], cand[b, lo:hi],
                                                       credit_alpha, credit_boost, credit_decay)
                if temperature > 0:
                    e = _position_draws(k_noise, b, lambda k: _exponential(k, lg.shape[-1]),
                                        range(G))
                    keep = filter_keep(lg, temperature, top_k, top_p)
                    x0 = np.argmax(np.where(keep, np.exp(lg) / e ** temperature, -1.0), -1)
                else:
                    x0 = np.argmax(lg, -1)
                if remasking == "low_confidence":
                    lc = lg.copy()
                    if confidence_eos_eot_inf:
                        lc[:, eos_id] = -np.inf
                    c = _softmax(lc)[np.arange(G), x0]
                else:
                    c = _position_draws(k_rand, b, lambda k: _uniform(k, ()), range(G))
                conf = np.where(cand[b], c, -np.inf)
                sched = _schedule(block_length, spb, i)
                if decoder == "hierarchy":
                    for g in np.nonzero(hierarchy_select(conf, cand[b], threshold,
                                                         low_threshold))[0]:
                        x[b, P + g] = x0[g]
                        committed[b, g] = True
                    continue
                if decoder == "credit" and threshold is None:
                    threshold = 0.9
                if threshold is None:
                    n = sched
                else:
                    floor = 1 if threshold_floor == "one" else sched
                    n = max(int((conf >= threshold).sum()), floor)
                n = min(n, int(cand[b].sum()))
                for g in np.argsort(-conf, kind="stable")[:n]:
                    x[b, P + g] = x0[g]
                    committed[b, g] = True
            trace["committed"].append(committed)
            trace["experts_per_token"].append(budget[:, P:].copy())
            trace["block"].append(blk)
            nfe += 1
            if adaptive and nfe % adaptive.update_interval == 0:
                for b, g in zip(*np.nonzero(cand & ~committed)):
                    remask[b, g] += 1
                    budget[b, P + g] = _grow(adaptive, remask[b, g])
            trace["remask_count"].append(remask.copy())
            i += 1
        if early_stop and eos_id is not None:
            for b in np.nonzero(active)[0]:
                if (x[b, P:P + hi] == eos_id).any():
                    active[b] = False
                    tail = x[b, P + hi:]
                    tail[tail == mask_id] = eos_id
    budget = np.where(valid, budget, 0) if adaptive else np.where(valid, k_max, 0)
    rem = np.zeros((B, P + G), np.int64)
    rem[:, P:] = remask
    x = np.where(valid, x, pad_id)
    return dict(tokens=x, nfe=nfe, expert_work=work, experts_per_token=budget, remask_count=rem,
                trace={k: np.asarray(v) for k, v in trace.items()})
