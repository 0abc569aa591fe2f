"""Decoders: which positions a step writes, as strategies of the one compiled loop.

Shape letters: B batch, G generated positions (the loop's region), K the current
block's positions (``block_length``), V vocab. Terms: a *candidate* is a masked
position of the current block; *commit* writes a sampled token onto a masked
position (mask-to-token, M2T); *edit* replaces an already written token
(token-to-token, T2T); *confidence* ranks positions; the *credit* of a token at a
position is evidence accumulated over a block's steps.

``generate(decoder=...)`` picks one (a frozen, hashable object riding in the static
``SamplerOptions``; the loop calls its methods at trace time):

- ``"fixed"``: LLaDA's fixed schedule (the convention's count per step).
- ``"threshold"``: threshold parallel decoding (Fast-dLLM, dInfer): every candidate
  above ``threshold``, at least a floor (``threshold_floor``).
- ``"credit"``: dInfer's ``CreditThresholdParallelDecoder`` (Credit Decoding,
  arXiv 2510.06133): each block keeps a credit ``C[b, k, v]``; every step decays it by
  ``credit_decay``, adds ``p_top1 ** credit_boost`` at the top-1 token of each
  candidate, and the threshold rule then runs on ``logits + credit_alpha *
  log(1 + C)``. Defaults alpha 0.7, boost 0.2, decay 0.8, threshold 0.9.
- ``"hierarchy"``: dInfer's ``HierarchyDecoder``: in each contiguous run of
  candidates the most confident (ties: all of them) if its confidence is
  ``> low_threshold`` (default 0.4); also every candidate ``> threshold`` (default
  off); always the block's most confident one.
- ``"joint"``: LLaDA2.1's joint threshold decoding (inclusionAI LLaDA2.1
  ``generate``): M2T commits the candidates ``> threshold`` (at least
  ``threshold_floor``, default one); T2T edits every written, non-prompt position of
  the block whose sampled token differs from the written one with confidence ``>
  edit_threshold``. When a block has no mask left, up to ``max_post_steps`` more
  steps edit only; a step that edits nothing ends the block. Speedy mode (S):
  ``threshold=0.5, edit_threshold=0.0``; quality mode (Q, the default):
  ``threshold=0.7, edit_threshold=0.5``; ``max_post_steps`` 16. LLaDA2.1's ``steps``
  does not bound a block (its loop runs until the block settles): neither does it here.

The sampling filters (``top_k``, ``top_p``) and the tempered confidence of the llada2
convention are here too (``sample_confidence``): LLaDA2's
``_sample_with_temperature_topk_topp``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jmoe.sampling import remasking as rm

DECODERS = ("fixed", "threshold", "credit", "hierarchy", "joint")
# the library's defaults of each decoder's traced knobs (dInfer's and LLaDA2.1's)
DEFAULT_THRESHOLD = {"threshold": 0.9, "credit": 0.9, "joint": 0.7}
DEFAULT_LOW_THRESHOLD = 0.4
DEFAULT_EDIT_THRESHOLD = 0.5
DEFAULT_MAX_POST_STEPS = 16
DEFAULT_CREDIT = {"credit_alpha": 0.7, "credit_boost": 0.2, "credit_decay": 0.8}


# ---------------------------------------------------------------- sampling filters

def top_k_keep(logits_BKV, k: int | None):
    """``[..., V]`` bool: tokens whose logit is at least the ``k``-th largest (ties at
    the ``k``-th value all kept, as ``torch.topk`` + ``logits < min_keep``)."""
    if k is None:
        return jnp.ones(logits_BKV.shape, bool)
    kth = jax.lax.top_k(logits_BKV, k)[0][..., -1:]
    return logits_BKV >= kth


def top_p_keep(scaled_BKV, p):
    """``[..., V]`` bool: the nucleus of ``softmax(scaled)``: tokens sorted by
    probability (ties by index) up to and including the first whose cumulative
    probability exceeds ``p`` (the most probable always kept)."""
    order = jnp.argsort(-scaled_BKV, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(scaled_BKV, order, -1), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # drop a token when the mass before it already exceeds p (the reference shifts its
    # ``cum > p`` mask right by one)
    drop_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > p], -1)
    return ~jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), -1)


def sample_confidence(logits_BKV, noise_keys, rand_keys, knobs, opts):
    """Sampled tokens and confidences ``[B, K]`` of ``logits`` (the mask token already
    forbidden), LLaDA2's ``_sample_with_temperature_topk_topp`` at ``temperature > 0``:
    the tempered logits ``l / T`` filtered by ``top_k`` then ``top_p``, a sample from
    their softmax (Gumbel-max with the library's random stream). The confidence is the
    remasking rule's: ``low_confidence`` is the sampled token's probability, tempered
    and filtered (``softmax(filtered l / T)``) under a convention with
    ``tempered_confidence`` (llada2, as LLaDA2's reference), else untempered
    ``softmax(l)`` (LLaDA, dInfer). At temperature 0 the filters do nothing (argmax).
    """
    unconfident = (opts.eos_id,) if opts.confidence_eos_eot_inf else ()
    if not opts.sampled:
        x0 = rm.sample_greedy(logits_BKV, None, noise_keys)
        conf = rm.CONFIDENCES[opts.remasking](logits_BKV, x0, rand_keys,
                                              unconfident_ids=unconfident)
        return x0, conf.astype(jnp.float32)
    t = knobs["temperature"]
    keep = top_k_keep(logits_BKV, opts.top_k)
    scaled = jnp.where(keep, logits_BKV / t, -jnp.inf)
    if opts.top_p:
        keep &= top_p_keep(scaled, knobs["top_p"])
        scaled = jnp.where(keep, scaled, -jnp.inf)
    filtered = jnp.where(keep, logits_BKV, -jnp.inf) if (opts.top_k or opts.top_p) else logits_BKV
    # argmax(l - T log E) is argmax(l / T - log E): a sample from softmax(l / T)
    x0 = rm.sample_gumbel(filtered, t, noise_keys)
    if opts.remasking == "low_confidence" and opts.convention.tempered_confidence:
        conf = rm.confidence_low(scaled, x0, rand_keys, unconfident_ids=unconfident)
    else:
        conf = rm.CONFIDENCES[opts.remasking](logits_BKV, x0, rand_keys,
                                              unconfident_ids=unconfident)
    return x0, conf.astype(jnp.float32)


# ---------------------------------------------------------------- decoders

@dataclasses.dataclass(frozen=True)
class Step:
    """What a decoder sees of one step (all ``[B, G]`` unless named otherwise)."""

    x0: jax.Array         # sampled tokens (garbage outside the block / uncomputed rows)
    conf: jax.Array       # their confidences (-inf outside the block)
    cand: jax.Array       # candidates: masked positions of the block, active rows
    gen: jax.Array        # the generated region's tokens before the step
    window: jax.Array     # [G] the current block
    fixed: jax.Array      # prompt and padding positions (never written)
    sched: jax.Array      # [B] the schedule's count
    active: jax.Array     # [B] rows not stopped


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The fixed schedule or the threshold rule, as the convention defines them."""

    name: str = "fixed"

    def init_carry(self, batch: int, block_length: int, vocab: int):
        """The decoder's own loop carry (a pytree, None if it has none)."""
        return None

    def reset(self, carry, over):
        """The carry after a step: back to its initial value when the block is over."""
        return carry

    def candidates(self, gen_BG, window_G, active_B, carry, opts):
        """``[B, G]`` the positions a step decodes: masked positions of the block in
        active rows."""
        return (gen_BG == opts.mask_id) & window_G & active_B[:, None]

    def call_rows(self, st: Step, carry):
        """``[B, G]``: positions that make their row compute this step."""
        return st.cand

    def model_inputs(self, carry, step):
        """Extra inputs of the step's model call from the carry (None: none; the
        uniform-noise denoiser feeds back its self-conditioning logits)."""
        return None

    def fuse(self, logits_BKV, carry, cand_BK, knobs):
        """Logits as the decoder samples them (credit), and the carry after the call."""
        return logits_BKV, carry

    def sample(self, logits_BKV, noise_keys, rand_keys, knobs, opts, carry, cand_BK, step):
        """``(x0_BK, conf_BK, carry)`` of the block's logits: the mask token (and with
        ``logits_eos_inf`` EOS) forbidden, the decoder's fusion (``fuse``), then
        ``sample_confidence``. ``step`` is the step within the block (0-based)."""
        forbidden = (opts.mask_id,) + ((opts.eos_id,) if opts.logits_eos_inf else ())
        # the mask token is never a prediction (so a block always empties; dInfer too)
        logits_BKV = rm.forbid_tokens(logits_BKV, forbidden)
        logits_BKV, carry = self.fuse(logits_BKV, carry, cand_BK, knobs)
        x0, conf = sample_confidence(logits_BKV, noise_keys, rand_keys, knobs, opts)
        return x0, conf, carry

    def block_tokens(self, gen_BG, window_G, over, active_B, carry):
        """The generated region once the block is ``over`` (a bool scalar): unchanged
        (the uniform-noise denoiser keeps its argmax canvas instead)."""
        return gen_BG

    def select(self, st: Step, knobs, opts, carry):
        """``(commit_BG, edit_BG, carry)``: candidates to commit, written positions to
        edit."""
        count = opts.convention.commit_count(opts)
        n_B = count(st.conf, st.cand, st.sched, knobs["threshold"])
        return rm.commit_mask(st.conf, st.cand, n_B), jnp.zeros_like(st.cand), carry

    def block_over(self, opts, step, still_BG, carry):
        return opts.convention.block_over(opts, step, still_BG)

    def max_calls(self, opts) -> int:
        return opts.convention.max_calls(opts)


@dataclasses.dataclass(frozen=True)
class _UntilEmpty(Decoder):
    """A block ends when it has no mask left; each step commits at least one."""

    def block_over(self, opts, step, still_BG, carry):
        return ~still_BG.any()

    def max_calls(self, opts) -> int:
        return max(opts.gen_length, opts.convention.max_calls(opts))


@dataclasses.dataclass(frozen=True)
class Credit(_UntilEmpty):
    """dInfer's credit decoder (``CreditThresholdParallelDecoder``); see the module doc."""

    name: str = "credit"

    def init_carry(self, batch, block_length, vocab):
        return jnp.zeros((batch, block_length, vocab), jnp.float32)

    def reset(self, carry, over):
        return jnp.where(over, jnp.zeros_like(carry), carry)

    def fuse(self, logits_BKV, carry, cand_BK, knobs):
        """Decay, boost the top-1 token of each candidate, fuse: dInfer's
        ``_apply_credit_fusion`` (its first call of a block decays a zero credit)."""
        p = jax.nn.softmax(logits_BKV.astype(jnp.float32), axis=-1)
        top_BK = jnp.argmax(p, axis=-1)
        boost_BK = jnp.max(p, axis=-1) ** knobs["credit_boost"] * cand_BK
        # rows without a candidate make no call of theirs (a row alone would not decay)
        decay_B = jnp.where(cand_BK.any(-1), knobs["credit_decay"], 1.0)
        credit = carry * decay_B[:, None, None]
        credit = credit + jax.nn.one_hot(top_BK, credit.shape[-1], dtype=jnp.float32) \
            * boost_BK[..., None]
        return logits_BKV + knobs["credit_alpha"] * jnp.log1p(credit), credit

    def select(self, st, knobs, opts, carry):
        count = rm.count_threshold(opts.threshold_floor, strict=opts.convention.threshold_strict)
        n_B = count(st.conf, st.cand, st.sched, knobs["threshold"])
        return rm.commit_mask(st.conf, st.cand, n_B), jnp.zeros_like(st.cand), carry


def _run_max_BG(conf_BG, cand_BG):
    """``[B, G]``: each candidate's run maximum (runs: contiguous candidates)."""
    g = cand_BG.shape[-1]
    start_BG = cand_BG & ~jnp.pad(cand_BG, ((0, 0), (1, 0)))[:, :-1]
    run_BG = jnp.cumsum(start_BG, axis=-1) - 1
    run_BG = jnp.where(cand_BG, run_BG, g)  # non-candidates: a discarded extra run
    conf_BG = jnp.where(cand_BG, conf_BG, -jnp.inf)
    run_max = jax.vmap(lambda c, r: jax.ops.segment_max(c, r, num_segments=g + 1))(conf_BG,
                                                                                     run_BG)
    return jnp.take_along_axis(run_max, run_BG, axis=-1)


@dataclasses.dataclass(frozen=True)
class Hierarchy(_UntilEmpty):
    """dInfer's ``HierarchyDecoder``; see the module doc. Comparisons are strict."""

    name: str = "hierarchy"

    def select(self, st, knobs, opts, carry):
        conf = jnp.where(st.cand, st.conf, -jnp.inf)
        runs = st.cand & (conf == _run_max_BG(conf, st.cand)) & (conf > knobs["low_threshold"])
        above = st.cand & (conf > knobs["threshold"])
        top = jax.nn.one_hot(jnp.argmax(conf, -1), conf.shape[-1], dtype=bool) \
            & st.cand.any(-1, keepdims=True)
        return (runs | above | top) & st.cand, jnp.zeros_like(st.cand), carry


@dataclasses.dataclass(frozen=True)
class Joint(Decoder):
    """LLaDA2.1's joint threshold decoding (M2T + T2T); see the module doc.

    Carry per row: ``post_B`` edit-only steps made in this block, ``settled_B`` an
    edit-only step edited nothing, ``next_B`` the row computes next step.
    """

    name: str = "joint"
    max_post_steps: int = DEFAULT_MAX_POST_STEPS

    def init_carry(self, batch, block_length, vocab):
        return {"post_B": jnp.zeros((batch,), jnp.int32),
                "settled_B": jnp.zeros((batch,), bool), "next_B": jnp.ones((batch,), bool)}

    def reset(self, carry, over):
        return jax.tree.map(lambda c, i: jnp.where(over, i, c), carry,
                            self.init_carry(carry["post_B"].shape[0], 0, 0))

    def _post(self, cand_BG, post_B, settled_B, st: Step):
        """Rows making an edit-only step: an active row with no mask in the block but
        positions it generated there (a block all prompt is not one of its blocks)."""
        editable_B = (st.window & ~st.fixed).any(-1)
        return (st.active & editable_B & ~cand_BG.any(-1) & (post_B < self.max_post_steps)
                & ~settled_B)

    def call_rows(self, st, carry):
        post_B = self._post(st.cand, carry["post_B"], carry["settled_B"], st)
        return st.cand | (post_B[:, None] & st.window)

    def select(self, st, knobs, opts, carry):
        count = rm.count_threshold(opts.threshold_floor, strict=True)
        n_B = count(st.conf, st.cand, st.sched, knobs["threshold"])
        commit = rm.commit_mask(st.conf, st.cand, n_B)
        post_B = self._post(st.cand, carry["post_B"], carry["settled_B"], st)
        busy_B = st.cand.any(-1) | post_B
        written_BG = st.window & ~st.fixed & (st.gen != opts.mask_id)
        edit = (written_BG & busy_B[:, None] & (st.x0 != st.gen)
                & (st.conf > knobs["edit_threshold"]))
        carry = {"post_B": carry["post_B"] + post_B.astype(jnp.int32),
                 "settled_B": carry["settled_B"] | (post_B & ~edit.any(-1))}
        still = st.cand & ~commit
        carry["next_B"] = still.any(-1) | self._post(still, carry["post_B"], carry["settled_B"],
                                                     st)
        return commit, edit, carry

    def block_over(self, opts, step, still_BG, carry):
        return ~carry["next_B"].any()

    def max_calls(self, opts) -> int:
        return max(opts.num_blocks * (opts.block_length + self.max_post_steps),
                   opts.convention.max_calls(opts))


def make(name: str, max_post_steps: int = DEFAULT_MAX_POST_STEPS) -> Decoder:
    """The decoder object of ``name`` (one of ``DECODERS``)."""
    if name == "joint":
        return Joint(max_post_steps=max_post_steps)
    return {"fixed": Decoder("fixed"), "threshold": Decoder("threshold"), "credit": Credit(),
            "hierarchy": Hierarchy()}[name]


def of(opts) -> Decoder:
    """``opts.decoder``, else the fixed schedule or threshold rule it implies."""
    return opts.decoder if opts.decoder is not None else Decoder(
        "threshold" if opts.thresholded else "fixed")
