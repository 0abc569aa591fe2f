"""Log-likelihoods of continuations for evaluation: LLaDA's masked-diffusion Monte
Carlo estimate (a lower bound) for mask-predicting models, the exact autoregressive sum
for causal ones. No lm_eval here: token ids in, floats out.

Shape letters: R rows (Monte Carlo draws of one or more requests), L sequence, V vocab.
Terms: *target* the continuation's tokens, *mask ratio* the fraction of the target
masked in one draw.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from jmoe.sampling.canvas import bucket_length, pad_id


@dataclasses.dataclass
class Usage:
    """Model work spent by the evaluator, summed over its calls."""

    model_calls: int = 0
    rows: int = 0
    expert_work: int = 0  # routed token-expert pairs over calls and MoE layers
    expert_reads: int = 0  # distinct experts routed to, over calls, MoE layers and rows

    def add(self, aux, rows: int) -> None:
        self.model_calls += 1
        self.rows += rows
        self.expert_work += int(aux["routed_pairs"])
        self.expert_reads += int(np.sum(aux["distinct_experts"]))


def mask_draws(rng: np.random.Generator, target_len: int, batch: int) -> np.ndarray:
    """One stratified batch of masks over a target, as LLaDA's evaluation draws them.

    ``k ~ U{1..L}``; row i masks ``x_i = ((round(k + i * L / batch) - 1) mod L) + 1``
    target positions, chosen uniformly without replacement, so the batch's mask
    ratios ``x_i / L`` spread evenly over (0, 1] (GSAI-ML/LLaDA ``eval_llada.py``,
    ``_forward_process``).

    Returns:
        bool ``[batch, target_len]``, row i holding exactly ``x_i >= 1`` True.
    """
    if target_len < 1 or batch < 1:
        raise ValueError(f"target_len={target_len}, batch={batch}: expected both >= 1")
    k = int(rng.integers(1, target_len + 1))
    x = np.round(np.linspace(k, k + (batch - 1) * (target_len / batch), batch)).astype(np.int64)
    x = (x - 1) % target_len + 1
    order = np.argsort(rng.random((batch, target_len)), axis=1)  # a random permutation per row
    mask = np.zeros((batch, target_len), bool)
    np.put_along_axis(mask, order, np.arange(target_len)[None, :] < x[:, None], axis=1)
    return mask


def _request_rng(seed: int, context: list[int], target_len: int) -> np.random.Generator:
    # Keyed by the context and the target's length: the choices of one multiple-choice
    # item (same context, same length) share their mask patterns, so their scores are
    # compared on common random numbers; and a request's score never depends on the
    # batch or order it came in.
    h = zlib.crc32(np.asarray(context, np.int64).tobytes())
    return np.random.default_rng([int(seed), h, int(target_len)])


def _left_pad(rows: list[list[int]], pad: int, length: int):
    tokens = np.full((len(rows), length), pad, np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = r
        valid[i, length - len(r):] = True
    return tokens, valid


def _log_softmax_at(logits_RLV, tokens_RL) -> np.ndarray:
    """``log softmax(logits)[r, l, tokens[r, l]]`` in float64 on the host."""
    lg = np.asarray(logits_RLV, np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[..., 0]
    return np.take_along_axis(lg, tokens_RL[..., None], -1)[..., 0] - lse


def diffusion_loglikelihood(model, pairs, *, mc_num: int = 128, mc_batch_size: int = 32,
                            seed: int = 0, cfg_scale: float = 0.0, forward_kw=None,
                            usage: Usage | None = None, progress=None) -> list[float]:
    """LLaDA's Monte Carlo estimate of ``log p(target | context)`` for a masked-diffusion
    model; an estimate of a lower bound (the ELBO), not the likelihood itself.

    For each request, ``mc_num`` draws in batches of ``mc_batch_size`` (``mask_draws``):
    a draw masks ``x`` of the ``L`` target tokens (the context is never masked), runs
    the model on context + partly masked target, and scores
    ``(L / x) * sum over masked positions of log p(true token)``; the estimate is the
    mean over the draws (GSAI-ML/LLaDA ``eval_llada.py``, ``get_log_likelihood``; the
    ``L / x`` weight is the ``1 / t`` of LLaDA's ELBO at mask ratio ``t = x / L``).

    Args:
        model: a ``jmoe.Model`` with ``config.mask_token_id``, not causal.
        pairs: ``[(context_ids, target_ids), ...]``, lists of ints, targets non-empty,
            each pair within ``max_position_embeddings``.
        mc_num: int >= 1, draws per request, a multiple of ``mc_batch_size``.
            Default 128 (LLaDA's).
        mc_batch_size: int >= 1, draws per stratified batch and rows per model call.
            Default 32 (LLaDA's ``batch_size``).
        seed: int, the draws' seed (combined with each request's context and target
            length: equal-length continuations of one context share their masks).
        cfg_scale: float >= 0, classifier-free guidance as LLaDA's ``get_logits``:
            ``un + (cfg_scale + 1) * (cond - un)``, ``un`` the logits with the context
            masked too (twice the rows). Default 0 (off).
        forward_kw: dict of ``jmoe.forward`` options (``experts_per_token``,
            ``max_experts``, ``experts_per_block``, ``set_coverage``) or None.
        usage: a ``Usage`` to add the calls' work to, or None.
        progress: a callable ``progress(n)`` told of each finished request, or None.

    Returns:
        One float per pair (natural log).

    Raises:
        ValueError: ``mc_num`` not a positive multiple of ``mc_batch_size``; a model
            without a mask token; an empty target; a pair past the model's positions.
    """
    from jmoe.model import forward

    config = model.config
    if not (isinstance(mc_batch_size, int) and mc_batch_size >= 1 and isinstance(mc_num, int)
            and mc_num >= 1 and mc_num % mc_batch_size == 0):
        raise ValueError(f"mc_num={mc_num!r}, mc_batch_size={mc_batch_size!r}: expected ints "
                         f">= 1 with mc_num a multiple of mc_batch_size")
    if config.mask_token_id is None:
        raise ValueError("the model has no mask_token_id: the masked-diffusion likelihood "
                         "needs one (jmoe.load(path, mask_token_id=...))")
    if not (isinstance(cfg_scale, (int, float)) and np.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale={cfg_scale!r}: expected a finite number >= 0")
    mask_id, pad = int(config.mask_token_id), pad_id(config)
    out = []
    for context, target in pairs:
        context, target = [int(t) for t in context], [int(t) for t in target]
        n, total = len(target), len(context) + len(target)
        if n == 0:
            raise ValueError(f"an empty continuation after context of {len(context)} tokens: "
                             f"expected at least one token to score")
        if total > config.max_position_embeddings:
            raise ValueError(f"context + continuation = {total} tokens exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        rng = _request_rng(seed, context, n)
        length = min(bucket_length(total), config.max_position_embeddings)
        score = 0.0
        for _ in range(mc_num // mc_batch_size):
            mask_RN = mask_draws(rng, n, mc_batch_size)
            noisy = np.where(mask_RN, mask_id, np.asarray(target)[None, :])
            rows = [context + r for r in noisy.tolist()]
            if cfg_scale > 0:  # the unconditional copies: the context masked as well
                rows += [[mask_id] * len(context) + r for r in noisy.tolist()]
            tokens, valid = _left_pad(rows, pad, length)
            logits, aux = forward(model, tokens, attention_mask=valid, **(forward_kw or {}))
            if usage is not None:
                usage.add(aux, len(rows))
            logits = np.asarray(logits)[:, length - n:]
            if cfg_scale > 0:
                cond, un = logits[:mc_batch_size], logits[mc_batch_size:]
                logits = un + (cfg_scale + 1) * (cond - un)
            logp_RN = _log_softmax_at(logits,
                                      np.broadcast_to(np.asarray(target), mask_RN.shape))
            x_R = mask_RN.sum(1)
            score += float(np.sum(np.where(mask_RN, logp_RN, 0.0).sum(1) * n / x_R))
        out.append(score / mc_num)
        if progress is not None:
            progress(1)
    return out


def causal_loglikelihood(model, pairs, *, forward_kw=None, usage: Usage | None = None,
                         progress=None) -> list[tuple[float, bool]]:
    """The exact autoregressive ``log p(target | context)`` of a causal model and whether
    the target is its greedy continuation.

    Args:
        model: a ``jmoe.Model`` with ``config.causal``.
        pairs: ``[(context_ids, target_ids), ...]``; the context must be non-empty
            (the first target token needs a position to be predicted from).
        forward_kw, usage, progress: as ``diffusion_loglikelihood``.

    Returns:
        ``[(logprob, is_greedy), ...]``.

    Raises:
        ValueError: an empty context or target; a pair past the model's positions.
    """
    from jmoe.model import forward

    config = model.config
    out = []
    for context, target in pairs:
        context, target = [int(t) for t in context], [int(t) for t in target]
        if not context or not target:
            raise ValueError(f"context of {len(context)} and continuation of {len(target)} "
                             f"tokens: a causal score needs both non-empty")
        row = context + target
        if len(row) > config.max_position_embeddings:
            raise ValueError(f"context + continuation = {len(row)} tokens exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        length = min(bucket_length(len(row)), config.max_position_embeddings)
        tokens, valid = _left_pad([row], pad_id(config), length)
        logits, aux = forward(model, tokens, attention_mask=valid, **(forward_kw or {}))
        if usage is not None:
            usage.add(aux, 1)
        n = len(target)
        pred = np.asarray(logits)[:, length - n - 1:length - 1]  # position t predicts t + 1
        logp = _log_softmax_at(pred, np.asarray(target)[None, :])
        greedy = bool(np.all(pred[0].argmax(-1) == np.asarray(target)))
        out.append((float(logp.sum()), greedy))
        if progress is not None:
            progress(1)
    return out
