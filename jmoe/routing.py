"""Routers and assignment: token-choice top-k, masked per-token top-k, expert choice.

OLMoE scores softmax (``softmax_topk``, ``expert_choice``); LLaDA2 scores sigmoid
(``sigmoid_group_topk``, ``sigmoid_expert_choice``). Both expert-choice routers
pick through one ``expert_choice_slots``.

Shape letters: B batch, L sequence, T tokens (flattened B*L), E experts, K experts
per token (a static bound ``bound``), C per-expert capacity (a static bound), A
assignments. Router math is float32 throughout: in bfloat16, ties between close
scores change which experts are selected.

Every router returns one ``Routing``: a flat list of A (token, expert, weight)
assignments that every expert backend consumes. A dropped assignment (beyond a
token's budget, a padding token, or an expert-choice slot past a sequence's
capacity) carries the sentinel expert id ``E``, so it sorts after every live one
and ``bincount(length=E)`` ignores it.

Layouts: token choice is token-major (``A = T*K``, the K slots of token t at
``t*K .. t*K+K-1``, ranked best first); expert choice is expert-major per
sequence (``A = B*E*C``, slot ``(b, e, c)`` at ``(b*E + e)*C + c``, ranked best
first).

Tie-breaks are deterministic and follow ``jax.lax.top_k`` (equal scores: the lower
index first): in token choice the lower expert id wins, in expert choice the
earlier position in the sequence wins.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jmoe import cpu_kernels
from jmoe.platform import kernels


@struct.dataclass
class Routing:
    """A flat list of A (token, expert, weight) assignments and their static bounds.

    Router logits are not part of it: routers return them beside it (aux statistics
    and capture need them; expert compute and expert parallelism do not).
    """

    token_A: jax.Array    # int32 [A]: the token row each assignment reads and writes
    expert_A: jax.Array   # int32 [A]: expert id, == num_experts when dropped
    weight_A: jax.Array   # float32 [A]: combine weight, 0 when dropped
    num_experts: int = struct.field(pytree_node=False)
    num_tokens: int = struct.field(pytree_node=False)
    # True when A = T*K with the K assignments of each token adjacent (token choice)
    token_major: bool = struct.field(pytree_node=False, default=True)
    # static bound on any expert's load; None means min(T, A) (a token meets an expert once)
    max_load: int | None = struct.field(pytree_node=False, default=None)

    @property
    def live_A(self):
        return self.expert_A < self.num_experts

    def expert_counts(self):
        """Tokens routed to each expert, ``[E]`` int32."""
        return jnp.bincount(self.expert_A, length=self.num_experts).astype(jnp.int32)

    def load_bound(self) -> int:
        """Static upper bound on any expert's load (the dropless worst case)."""
        bound = min(self.num_tokens, self.expert_A.shape[0])
        return bound if self.max_load is None else min(bound, self.max_load)

    def combine_weights(self):
        """Dense combine weights ``[T, E]`` float32 (0 where expert e did not take token t)."""
        t, e = self.num_tokens, self.num_experts
        w = jnp.zeros((t, e + 1), jnp.float32).at[self.token_A, self.expert_A].add(self.weight_A)
        return w[:, :e]

    def per_token(self):
        """``(expert_ids_TK, weights_TK)``: each token's experts, id ``E`` marking an empty slot.

        Token choice: K = the budget bound, ranked best first. Expert choice: K = E,
        slot e holds expert e when it picked the token (so ids are ``e`` or ``E``).
        """
        t, e = self.num_tokens, self.num_experts
        if self.token_major:
            return self.expert_A.reshape(t, -1), self.weight_A.reshape(t, -1)
        picked = jnp.zeros((t, e + 1), bool).at[self.token_A, self.expert_A].set(True)[:, :e]
        ids = jnp.where(picked, jnp.arange(e, dtype=jnp.int32)[None, :], e).astype(jnp.int32)
        return ids, self.combine_weights()

    def unrouted_tokens(self, valid_T=None):
        """Number of valid tokens that no expert took (they pass through the residual only)."""
        t = self.num_tokens
        routed = jnp.zeros((t,), jnp.int32).at[self.token_A].add(self.live_A.astype(jnp.int32))
        valid = jnp.ones((t,), bool) if valid_T is None else valid_T
        return jnp.sum((routed == 0) & valid).astype(jnp.int32)


def combine(y_AD, r: Routing):
    """Weighted sum of assignment outputs into their tokens, ``[T, D]``."""
    y_AD = y_AD * r.weight_A[:, None].astype(y_AD.dtype)
    t, a = r.num_tokens, y_AD.shape[0]
    if t and a % t == 0 and r.token_major:
        # token-major layout (token choice): the K assignments of a token are adjacent
        return y_AD.reshape(t, a // t, -1).sum(1)
    return jax.ops.segment_sum(y_AD, r.token_A, num_segments=t)


@struct.dataclass
class Budget:
    """How many experts each token may take: the one budget value of a model call.

    ``per_token`` is ``None`` (every token takes ``bound``), an int32 scalar, or an
    int32 ``[B, L]`` array with values in ``1..bound`` (traced values are clipped to
    that range). ``bound`` is static: the top-k the router computes and the most
    experts any token can take. Under expert choice ``bound`` is the k of the capacity
    ``C = ceil(capacity_factor * L * k / E)`` and ``per_token`` must be None. Built and
    checked once at the API boundary (``make_budget``).
    """

    per_token: jax.Array | None
    bound: int = struct.field(pytree_node=False)
    # block expert sets (``restrict_experts``): at most ``experts_per_block`` distinct
    # experts per layer and sequence; None: unrestricted
    experts_per_block: int | None = struct.field(pytree_node=False, default=None)
    expert_set_rule: str = struct.field(pytree_node=False, default="mass")
    # the share of the sequence's summed score the set must cover (1.0: exactly M)
    set_coverage: float = struct.field(pytree_node=False, default=1.0)
    # given sets: bool [n_moe, B, E] (one per MoE layer), used where ``refresh_set`` is
    # False (a traced bool scalar; None: always used); None: every call picks its own
    expert_set: jax.Array | None = None
    refresh_set: jax.Array | None = None

    def for_layer(self, i: int) -> "Budget":
        """The budget of MoE layer ``i`` (its row of the given expert sets)."""
        if self.expert_set is None:
            return self
        return self.replace(expert_set=self.expert_set[i])

    def per_token_T(self, b: int, l: int):
        """The budgets flattened to ``[B*L]`` (None when every token takes ``bound``)."""
        if self.per_token is None:
            return None
        return jnp.broadcast_to(jnp.asarray(self.per_token, jnp.int32), (b, l)).reshape(-1)


def make_budget(config, experts_per_token=None, max_experts=None,
                shape_BL: tuple[int, int] | None = None, experts_per_block=None,
                set_coverage=1.0) -> Budget:
    """The ``Budget`` of a call from the public spellings, checked once.

    ``experts_per_token``: None (the model's top-k), an int (this call's top-k, a static
    bound), or an int array ``[B, L]`` (or broadcastable to it) of per-token budgets
    ``1..max_experts``. ``max_experts``: the static bound (default: the model's top-k,
    or the int given; at most ``num_experts``). ``shape_BL``: the call's ``[B, L]``, to
    check an array's shape against (None: not checked). Raises ValueError naming the
    bad value, dtype or shape and what was expected; per-token budgets with
    expert-choice routing are a ValueError too. ``experts_per_block``: None or an int
    M in ``bound..E``: each sequence's tokens use at most M distinct experts per layer
    (the ``mass`` rule, ``block_expert_set``); token choice only (``check_expert_set``).
    ``set_coverage``: a float in ``(0, 1]`` (default 1.0: exactly M): each set keeps
    only its largest experts covering that share of its summed score, at least the
    bound; below 1 it needs ``experts_per_block``.
    """
    top_k, e = config.num_experts_per_tok, config.num_experts
    if max_experts is not None and not (_is_int(max_experts) and 1 <= int(max_experts) <= e):
        raise ValueError(f"max_experts={max_experts!r}: expected an int in 1..num_experts={e}")
    if experts_per_token is None:
        budget = Budget(None, int(max_experts or top_k))
    elif _is_int(experts_per_token):
        k = int(experts_per_token)
        bound = int(max_experts or max(k, top_k))
        check_budget(k, bound, e)
        # a bare int is the model's top-k for this call: a static bound, no masking
        budget = Budget(None, k) if max_experts is None else Budget(jnp.int32(k), bound)
    else:
        bound = int(max_experts or top_k)
        check_budget(experts_per_token, bound, e, shape_BL)
        budget = Budget(jnp.asarray(experts_per_token, jnp.int32), bound)
    if budget.per_token is not None and config.routing == "expert_choice":
        raise ValueError("experts_per_token as per-token budgets (or with max_experts) needs "
                         "routing='token_choice'; with routing='expert_choice' pass a scalar k "
                         "(it sets the capacity C = ceil(capacity_factor * L * k / E))")
    m = check_expert_set(config, experts_per_block, "mass", budget.bound)
    cov = check_set_coverage(set_coverage, m)
    return budget if m is None else budget.replace(experts_per_block=m, set_coverage=cov)


def check_set_coverage(set_coverage, experts_per_block=None) -> float:
    """``set_coverage`` as a float in ``(0, 1]`` (one-line ValueError otherwise); a
    value below 1 needs block expert sets (``experts_per_block``)."""
    cov = set_coverage
    if isinstance(cov, bool) or not isinstance(cov, numbers.Real) or not 0.0 < float(cov) <= 1.0:
        raise ValueError(f"set_coverage={cov!r}: expected a float in (0, 1]")
    if float(cov) < 1.0 and experts_per_block is None:
        raise ValueError(f"set_coverage={cov!r} refines block expert sets: it needs "
                         "experts_per_block")
    return float(cov)


EXPERT_SETS = ("mass", "first_step", "topk_mass")


def check_expert_set(config, experts_per_block, expert_set: str = "mass",
                     bound: int | None = None) -> int | None:
    """Validate block expert-set options (one-line ValueErrors); returns M as an int.

    ``experts_per_block``: None (off) or an int ``M`` with ``bound <= M <= E`` (bound:
    the call's top-k, default the model's); ``expert_set`` one of ``EXPERT_SETS``;
    block sets need ``routing='token_choice'`` (under expert choice every expert picks
    tokens, so a per-sequence set of experts is not a routing restriction).
    """
    if expert_set not in EXPERT_SETS:
        raise ValueError(f"expert_set={expert_set!r}: expected one of {EXPERT_SETS}")
    if experts_per_block is None:
        return None
    e = config.num_experts
    k = config.num_experts_per_tok if bound is None else bound
    if not _is_int(experts_per_block) or not k <= int(experts_per_block) <= e:
        raise ValueError(f"experts_per_block={experts_per_block!r}: expected an int in "
                         f"top-k={k}..num_experts={e}")
    if config.routing != "token_choice":
        raise ValueError(f"experts_per_block={experts_per_block} needs routing='token_choice'"
                         f"; with routing={config.routing!r} experts pick tokens, so block "
                         f"expert sets do not apply")
    return int(experts_per_block)


def set_scores(config, logits_BLE, params):
    """The per-token expert scores a set rule sums ``[B, L, E]`` float32: the softmax
    probabilities (OLMoE) or the selection scores ``sigmoid(logits) + expert_bias``
    (LLaDA2: what its top-k ranks)."""
    logits_BLE = logits_BLE.astype(jnp.float32)
    if config.router == "sigmoid_group_topk":
        return jax.nn.sigmoid(logits_BLE) + params["expert_bias"].astype(jnp.float32)
    return jax.nn.softmax(logits_BLE, axis=-1)


def _largest(mass_BE, m: int, coverage: float = 1.0, least: int = 1):
    """Bool ``[B, E]``: per row the ``m`` largest entries of ``mass_BE`` (ties: the lower
    id), or with ``coverage < 1`` the fewest of them, in order, whose sum reaches
    ``coverage`` of the row's total -- at least ``least`` and at most ``m`` (top-p over
    experts, applied to the set)."""
    b, e = mass_BE.shape
    top_BM, ids_BM = jax.lax.top_k(mass_BE, m)
    keep_BM = jnp.ones(top_BM.shape, bool)
    if coverage < 1.0:
        before_BM = jnp.cumsum(top_BM, axis=-1) - top_BM  # the mass of the larger ones
        keep_BM = ((before_BM < coverage * mass_BE.sum(-1, keepdims=True))
                   | (jnp.arange(m) < least))
    return jnp.zeros((b, e), bool).at[jnp.arange(b)[:, None], ids_BM].set(keep_BM)


def mass_set(scores_BLE, valid_BL, m: int, coverage: float = 1.0, least: int = 1):
    """The ``mass`` rule: per sequence, the ``m`` experts with the largest score summed
    over its valid tokens (ties: the lower id); with ``coverage < 1`` only as many of
    them as cover that share of the summed score, at least ``least``. Returns bool
    ``[B, E]``."""
    mass_BE = jnp.where(valid_BL[..., None], scores_BLE, 0.0).sum(1)
    return _largest(mass_BE, m, coverage, least)


def topk_mass_set(scores_BLE, valid_BL, m: int, k: int, coverage: float = 1.0):
    """The ``topk_mass`` rule: per sequence, the ``m`` experts with the largest sum of the
    scores that put them in a valid token's own top-``k`` (each token votes for its
    unrestricted top-k with its scores; ties: the lower id); ``coverage`` as
    ``mass_set`` (at least ``k``). Returns bool ``[B, E]``."""
    b, l, e = scores_BLE.shape
    top_v, top_i = jax.lax.top_k(scores_BLE, k)
    top_v = jnp.where(valid_BL[..., None], top_v, 0.0)
    mass_BE = jnp.zeros((b, e), jnp.float32).at[
        jnp.arange(b)[:, None, None], top_i].add(top_v)
    return _largest(mass_BE, m, coverage, k)


def block_expert_set(config, logits_BLE, params, valid_BL, budget: Budget):
    """The experts each sequence may use in this call, bool ``[B, E]`` (None: all).

    Rules (``budget.expert_set_rule``), after dMoE's block expert sets and TEAM's
    temporal consistency of routing across denoising steps:
      ``mass``        every call picks the ``M`` experts with the largest summed router
                      score over the call's valid tokens of that sequence (``mass_set``);
      ``first_step``  the set is picked by ``mass`` at a block's first step and then
                      given back (``budget.expert_set``) for the block's later steps;
      ``topk_mass``   every call picks the ``M`` experts with the largest score summed
                      over the tokens that rank them in their own top-k (the call's
                      ``bound``; ``topk_mass_set``): a vote of the tokens' preferred
                      experts rather than of their whole score distributions.
    With ``budget.set_coverage < 1`` a rule keeps only as many of its ``M`` experts, in
    order, as cover that share of the sequence's summed score (at least the call's
    top-k): a call whose tokens agree reads fewer than ``M`` experts' weights.
    Given sets are used where ``budget.refresh_set`` is False, else the rule picks.
    """
    m = budget.experts_per_block
    if m is None:
        return None
    scores_BLE = set_scores(config, logits_BLE, params)
    if budget.expert_set_rule == "topk_mass":
        fresh_BE = topk_mass_set(scores_BLE, valid_BL, m, budget.bound, budget.set_coverage)
    else:
        fresh_BE = mass_set(scores_BLE, valid_BL, m, budget.set_coverage, budget.bound)
    if budget.expert_set is None:
        return fresh_BE
    given_BE = jnp.asarray(budget.expert_set, bool)
    if budget.refresh_set is None:
        return given_BE
    return jnp.where(budget.refresh_set, fresh_BE, given_BE)


def _broadcasts(shape: tuple, target: tuple) -> bool:
    """Whether an array of ``shape`` broadcasts to exactly ``target``."""
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def argsort_ids(ids_A, num_values: int):
    """Stable argsort of small non-negative ints (expert or shard ids, ``<= num_values``).

    Sorting the single int32 key ``id * A + index`` gives the stable order, about 5x
    faster on CPU than a two-operand stable ``argsort`` (measured at A=8192); a
    plain stable argsort when the key would not fit in int32.
    """
    a = ids_A.shape[0]
    if (num_values + 1) * a >= 2 ** 31:
        return jnp.argsort(ids_A, stable=True)
    return jax.lax.sort(ids_A.astype(jnp.int32) * a + jnp.arange(a, dtype=jnp.int32)) % a


def top_k_ids(scores_TE, k: int, platform: str | None = None):
    """Ids ``[T, k]`` of each token's k best experts: ``jax.lax.top_k(scores_TE, k)[1]``
    (largest first, ties to the lower id). For a CPU target with jmoe's kernels
    (``jmoe.platform``) the compiled ``jmoe_top_k`` kernel computes it over the thread
    pool (XLA's TopK is single-threaded: 0.7 ms against ~0.1 ms at [1024, 64]);
    elsewhere ``lax.top_k``."""
    if kernels(platform).cpu_kernels:
        return cpu_kernels.top_k_ids(scores_TE, k)
    return jax.lax.top_k(scores_TE, k)[1]


def check_budget(experts_per_token, bound: int, num_experts: int,
                 shape_BL: tuple[int, int] | None = None):
    """Validate a budget outside jit: a ValueError naming the bad value, dtype or shape.

    The dtype and, given ``shape_BL``, the shape (a scalar or broadcastable to
    ``[B, L]``) are checked on traced budgets too; their values cannot be inspected
    inside jit and are clipped to ``[1, bound]`` there.
    """
    if experts_per_token is None:
        return
    k = experts_per_token
    if not isinstance(k, jax.Array):
        try:
            k = np.asarray(k)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"experts_per_token must be an int or an int array: {err}") \
                from None
    if k.dtype.kind not in "iu":  # floats would be truncated, bools are no counts
        raise ValueError(f"experts_per_token must be integers, got dtype {k.dtype}: expected an "
                         f"int or an array of ints (numbers of experts)")
    if shape_BL is not None and k.ndim and not _broadcasts(tuple(k.shape), tuple(shape_BL)):
        raise ValueError(f"experts_per_token has shape {tuple(k.shape)}: expected a scalar or "
                         f"an array broadcastable to the tokens' [B, L] = {tuple(shape_BL)}")
    if isinstance(k, jax.core.Tracer):
        return
    k = np.asarray(k)  # a concrete array: inspect it on the host, even inside a jit trace
    if bound > num_experts:
        raise ValueError(f"max_experts={bound} exceeds num_experts={num_experts}")
    if k.size and (k.min() < 1 or k.max() > bound):
        bad = int(k.min()) if k.min() < 1 else int(k.max())
        raise ValueError(
            f"experts_per_token value {bad} is outside the allowed range 1..{bound} "
            f"(max_experts={bound}, num_experts={num_experts})")


def rank_mask(bound: int, budget_T, valid_T):
    """``[T, K]`` bool: slot j of token t is live iff ``j < budget_t`` and t is valid."""
    t = valid_T.shape[0]
    if budget_T is None:
        live = jnp.ones((t, bound), bool)
    else:
        budget = jnp.clip(jnp.broadcast_to(budget_T, (t,)), 1, bound)
        live = jnp.arange(bound)[None, :] < budget[:, None]
    return live & valid_T[:, None]


def softmax_topk(logits_TE, *, bound: int, norm_topk_prob: bool, budget_T=None,
                 valid_T=None, platform: str | None = None, allowed_TE=None) -> Routing:
    """OLMoE token choice: softmax over all experts, keep the top-k_i of each token.

    Weights are the softmax probabilities of the kept experts, renormalised over
    the kept set when ``norm_topk_prob``. With every budget equal to ``bound`` this
    is bit-identical to plain top-k. A concrete out-of-range budget is a
    ValueError; a traced one (inside jit) cannot be inspected and is clipped to
    ``[1, bound]``. Ties: the lower expert id ranks first.

    Example:
        r = softmax_topk(logits_TE, bound=8, norm_topk_prob=False, budget_T=k_T)
    """
    logits_TE = logits_TE.astype(jnp.float32)
    t, e = logits_TE.shape
    if not (isinstance(bound, int) and 1 <= bound <= e):
        raise ValueError(f"bound={bound!r}: expected an int in 1..num_experts={e}")
    check_budget(budget_T, bound, e)
    if valid_T is None:
        valid_T = jnp.ones((t,), bool)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if allowed_TE is None:
        top_e_TK = top_k_ids(probs_TE, bound, platform)
    else:  # probabilities are >= 0: -1 ranks every excluded expert last
        top_e_TK = top_k_ids(jnp.where(allowed_TE, probs_TE, -1.0), bound, platform)
    top_p_TK = jnp.take_along_axis(probs_TE, top_e_TK, axis=-1)
    live_TK = rank_mask(bound, budget_T, valid_T)
    if allowed_TE is not None:
        live_TK = live_TK & jnp.take_along_axis(allowed_TE, top_e_TK, axis=-1)
    w_TK = jnp.where(live_TK, top_p_TK, 0.0)
    if norm_topk_prob:
        w_TK = w_TK / jnp.maximum(w_TK.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    expert_TK = jnp.where(live_TK, top_e_TK, e).astype(jnp.int32)
    token_TK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, bound))
    return Routing(token_A=token_TK.reshape(-1), expert_A=expert_TK.reshape(-1),
                   weight_A=w_TK.reshape(-1), num_experts=e, num_tokens=t)


def expert_capacities(length: int, k: int, num_experts: int,
                      capacity_factor: float) -> tuple[int, ...]:
    """Expert-choice capacity ``C(n) = min(n, ceil(capacity_factor * n * k / E))``, n = 0..length.

    A static table: a sequence of real length n lets each expert pick C(n) tokens.
    It is computed once in Python (float64) so traced code and NumPy oracles agree
    to the integer, and ``C(length)`` is the static bound. C is non-decreasing in n.
    """
    if not (isinstance(k, int) and 1 <= k <= num_experts):
        raise ValueError(f"expert choice k={k!r}: expected an int in 1..num_experts={num_experts}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r}: expected > 0")
    return tuple(min(n, math.ceil(capacity_factor * n * k / num_experts))
                 for n in range(length + 1))


def expert_choice_slots(select_BLE, valid_BL, *, k: int, capacity_factor: float):
    """Each expert's picks within each sequence, the shared core of expert choice.

    In sequence b of real length L_b expert e picks the ``C_b = min(L_b, ceil(cf *
    L_b * k / E))`` valid positions with the highest ``select_BLE[b, :, e]`` (ties:
    the earlier position, ``lax.top_k`` order). Returns ``(pos_BEC, live_BEC)``:
    the picked positions best first, padded to the static bound ``C = C(L)``, and
    which slots are real (the first C_b). Padding scores -inf, below every finite
    score, and at most L_b slots are live, so padding is never picked.
    """
    b, l, e = select_BLE.shape
    if valid_BL is None:
        valid_BL = jnp.ones((b, l), bool)
    caps = expert_capacities(l, k, e, capacity_factor)
    score_BEL = jnp.where(valid_BL[:, None, :], jnp.swapaxes(select_BLE, 1, 2), -jnp.inf)
    _, pos_BEC = jax.lax.top_k(score_BEL, caps[l])
    c_B = jnp.asarray(caps, jnp.int32)[valid_BL.sum(-1)]
    live_BEC = jnp.arange(caps[l])[None, None, :] < c_B[:, None, None]
    return pos_BEC.astype(jnp.int32), live_BEC


def expert_major_routing(pos_BEC, live_BEC, weight_BEC, logits_BLE) -> Routing:
    """The ``Routing`` of expert-choice slots: slot ``(b, e, c)`` at ``(b*E + e)*C + c``."""
    b, l, e = logits_BLE.shape
    token_BEC = pos_BEC + (jnp.arange(b, dtype=jnp.int32) * l)[:, None, None]
    expert_BEC = jnp.where(live_BEC, jnp.arange(e, dtype=jnp.int32)[None, :, None], e)
    return Routing(token_A=token_BEC.reshape(-1).astype(jnp.int32),
                   expert_A=expert_BEC.reshape(-1).astype(jnp.int32),
                   weight_A=jnp.where(live_BEC, weight_BEC, 0.0).reshape(-1),
                   num_experts=e, num_tokens=b * l, token_major=False,
                   max_load=b * pos_BEC.shape[-1])


def expert_choice(logits_BLE, *, k: int, capacity_factor: float = 1.0, valid_BL=None) -> Routing:
    """Expert-choice routing within each sequence (Zhou et al. 2022), OLMoE's softmax scores.

    Router probabilities are the softmax over experts (float32). In sequence b of
    real length L_b, every expert picks its top ``C_b = min(L_b, ceil(cf * L_b * k /
    E))`` tokens by probability; the combine weight is that probability (not
    renormalised). Experts never pick across sequences, so a sequence's output does
    not depend on its batch-mates, and padding positions are never picked. A static
    bound ``C = C(L)`` with a per-sequence slot mask keeps shapes static; masked
    slots get the sentinel expert id. Ties: the earlier position wins (``lax.top_k``
    order). The picking is ``expert_choice_slots``, shared with LLaDA2's
    ``sigmoid_expert_choice``.

    Example:
        r = expert_choice(logits_BLE, k=2, capacity_factor=1.0, valid_BL=mask)
    """
    logits_BLE = logits_BLE.astype(jnp.float32)
    probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
    pos_BEC, live_BEC = expert_choice_slots(probs_BLE, valid_BL, k=k,
                                            capacity_factor=capacity_factor)
    weight_BEC = jnp.take_along_axis(jnp.swapaxes(probs_BLE, 1, 2), pos_BEC, axis=2)
    return expert_major_routing(pos_BEC, live_BEC, weight_BEC, logits_BLE)


def load_balancing_stats(logits_TE, k: int, valid_T=None, platform: str | None = None):
    """Per-layer terms of the Switch/OLMoE auxiliary loss, over valid tokens only.

    Returns ``(f_E, p_E)``: f the fraction of top-k assignments on each expert
    (summing to k), p the mean router probability of each expert. The loss over a
    model is ``E * sum(mean_layers(f) * mean_layers(p))``, as in transformers.
    """
    t, e = logits_TE.shape
    valid = jnp.ones((t,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    probs = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    top_e = top_k_ids(probs, k, platform)
    counts = jnp.zeros((e,), jnp.float32).at[top_e.reshape(-1)].add(jnp.repeat(valid, k))
    n = jnp.maximum(valid.sum(), 1.0)
    return counts / n, (probs * valid[:, None]).sum(0) / n


def load_balancing_loss(f_LE, p_LE):
    """``E * sum_e mean_l(f) * mean_l(p)`` from stacked per-layer stats ``[L, E]``."""
    e = f_LE.shape[-1]
    return e * jnp.sum(f_LE.mean(0) * p_LE.mean(0))


def sigmoid_group_topk(logits_TE, expert_bias_E, *, bound: int, n_group: int, topk_group: int,
                       scaling: float, normalize: bool = True, budget_T=None,
                       valid_T=None, platform: str | None = None, allowed_TE=None) -> Routing:
    """LLaDA2 token choice: sigmoid scores, group-limited top-k with a selection bias.

    Selection ranks ``sigmoid(logits) + expert_bias``; only experts of the
    ``topk_group`` groups with the largest sum of their two best biased scores
    compete. Weights are the *unbiased* scores of the kept experts (the first k_i
    of the ranking), normalised over the kept set (when ``normalize``; the
    reference does so whenever top-k > 1) and multiplied by ``scaling``.

    ``allowed_TE`` (bool ``[T, E]``, a block expert set): the other experts are treated
    as absent: a group scores the sum of its (up to) two best *allowed* biased scores
    (-inf when it has none), the ``topk_group`` best groups compete, and a token takes
    its top-k among their allowed experts; a slot left without one is dropped. An
    all-True set changes nothing.
    """
    logits_TE = logits_TE.astype(jnp.float32)
    t, e = logits_TE.shape
    if valid_T is None:
        valid_T = jnp.ones((t,), bool)
    scores_TE = jax.nn.sigmoid(logits_TE)
    biased_TE = scores_TE + expert_bias_E.astype(jnp.float32)
    if allowed_TE is not None:
        biased_TE = jnp.where(allowed_TE, biased_TE, -jnp.inf)
    grouped = biased_TE.reshape(t, n_group, e // n_group)
    top2_TG2 = jax.lax.top_k(grouped, 2)[0]
    if allowed_TE is None:
        group_score_TG = top2_TG2.sum(-1)
    else:  # a missing second best counts 0; a group with no allowed expert stays -inf
        group_score_TG = jnp.where(jnp.isfinite(top2_TG2[..., 1]), top2_TG2.sum(-1),
                                   top2_TG2[..., 0])
    _, keep_groups = jax.lax.top_k(group_score_TG, topk_group)
    group_live_TG = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep_groups].set(True)
    expert_live_TE = jnp.repeat(group_live_TG, e // n_group, axis=1)
    top_e_TK = top_k_ids(jnp.where(expert_live_TE, biased_TE, -jnp.inf), bound, platform)
    live_TK = rank_mask(bound, budget_T, valid_T)
    if allowed_TE is not None:
        live_TK = live_TK & jnp.take_along_axis(allowed_TE & expert_live_TE, top_e_TK, axis=1)
    w_TK = jnp.where(live_TK, jnp.take_along_axis(scores_TE, top_e_TK, axis=1), 0.0)
    if normalize:
        w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20)
    w_TK = w_TK * scaling
    expert_TK = jnp.where(live_TK, top_e_TK, e).astype(jnp.int32)
    token_TK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, bound))
    return Routing(token_A=token_TK.reshape(-1), expert_A=expert_TK.reshape(-1),
                   weight_A=w_TK.reshape(-1), num_experts=e, num_tokens=t)


def sigmoid_expert_choice(logits_BLE, *, k: int, capacity_factor: float = 1.0,
                          scaling: float = 1.0, normalize: bool = True, valid_BL=None) -> Routing:
    """LLaDA2 expert choice: sigmoid scores, each expert picks its top tokens per sequence.

    Scores are ``s = sigmoid(logits)`` (float32). In sequence b of real length L_b
    every expert picks its ``C_b = min(L_b, ceil(cf * L_b * k / E))`` valid tokens of
    highest score: the capacity rule, tie-break (earlier position) and padding rule of
    OLMoE's ``expert_choice``, through the same ``expert_choice_slots``. A token's
    weights are the scores of the experts that picked it, normalised over those
    experts (when ``normalize``; LLaDA2 token choice does so whenever top-k > 1) and
    times ``scaling``: a token picked by some experts is weighted exactly as token
    choice would weight that expert set. A token no expert picked gets no routed
    output (the residual and the shared expert only).

    Two token-choice terms do not apply. The group limit (``n_group`` /
    ``topk_group``) restricts the experts a *token* may choose; here experts choose.
    The selection bias ``expert_bias`` adds the same ``bias_e`` to every token's
    score for expert e, so it cannot change which tokens e ranks highest (expert
    choice balances load by construction, every expert taking C_b tokens); added in
    float32 it would only round close scores into ties, so it is not an input.
    Sigmoid is increasing: tokens are ranked by their logits, the score order without
    float32 saturation (sigmoid rounds to 1.0 above a logit of about 17).

    Example:
        r = sigmoid_expert_choice(logits_BLE, k=8, capacity_factor=1.0, scaling=2.5,
                                  valid_BL=mask)
    """
    logits_BLE = logits_BLE.astype(jnp.float32)
    b, l, e = logits_BLE.shape
    pos_BEC, live_BEC = expert_choice_slots(logits_BLE, valid_BL, k=k,
                                            capacity_factor=capacity_factor)
    scores_BEL = jax.nn.sigmoid(jnp.swapaxes(logits_BLE, 1, 2))
    s_BEC = jnp.where(live_BEC, jnp.take_along_axis(scores_BEL, pos_BEC, axis=2), 0.0)
    if normalize:
        b_idx = jnp.arange(b)[:, None, None]
        # each (b, e) row picks distinct positions: scatter, then sum the experts in order
        picked_BEL = jnp.zeros((b, e, l), jnp.float32).at[
            b_idx, jnp.arange(e)[None, :, None], pos_BEC].add(s_BEC)
        denom_BEC = picked_BEL.sum(1)[b_idx, pos_BEC]
        s_BEC = s_BEC / (denom_BEC + 1e-20)
    return expert_major_routing(pos_BEC, live_BEC, s_BEC * scaling, logits_BLE)


# -- the router table: (router kind, routing strategy) -> Routing ------------------------------

def _allowed_TE(allowed_BE, b: int, l: int):
    if allowed_BE is None:
        return None
    return jnp.broadcast_to(allowed_BE[:, None, :], (b, l, allowed_BE.shape[-1])).reshape(b * l, -1)


def _softmax_token_choice(config, logits_BLE, params, valid_BL, budget: Budget,
                          allowed_BE=None) -> Routing:
    b, l, e = logits_BLE.shape
    return softmax_topk(logits_BLE.reshape(b * l, e), bound=budget.bound,
                        norm_topk_prob=config.norm_topk_prob, budget_T=budget.per_token_T(b, l),
                        valid_T=valid_BL.reshape(-1), platform=config.platform,
                        allowed_TE=_allowed_TE(allowed_BE, b, l))


def _softmax_expert_choice(config, logits_BLE, params, valid_BL, budget: Budget,
                           allowed_BE=None) -> Routing:
    return expert_choice(logits_BLE, k=budget.bound, capacity_factor=config.capacity_factor,
                         valid_BL=valid_BL)


def _sigmoid_token_choice(config, logits_BLE, params, valid_BL, budget: Budget,
                          allowed_BE=None) -> Routing:
    b, l, e = logits_BLE.shape
    return sigmoid_group_topk(
        logits_BLE.reshape(b * l, e), params["expert_bias"], bound=budget.bound,
        n_group=config.n_group, topk_group=config.topk_group,
        scaling=config.routed_scaling_factor, normalize=config.num_experts_per_tok > 1,
        budget_T=budget.per_token_T(b, l), valid_T=valid_BL.reshape(-1),
        platform=config.platform, allowed_TE=_allowed_TE(allowed_BE, b, l))


def _sigmoid_expert_choice(config, logits_BLE, params, valid_BL, budget: Budget,
                           allowed_BE=None) -> Routing:
    # the group limit and the expert bias do not apply (see sigmoid_expert_choice)
    return sigmoid_expert_choice(
        logits_BLE, k=budget.bound, capacity_factor=config.capacity_factor,
        scaling=config.routed_scaling_factor, normalize=config.num_experts_per_tok > 1,
        valid_BL=valid_BL)


def _gemma_token_choice(config, logits_BLE, params, valid_BL, budget: Budget,
                        allowed_BE=None) -> Routing:
    # DiffusionGemma (transformers' DiffusionGemmaTextRouter): softmax over all experts,
    # top-k, renormalised over the kept experts, then times the chosen expert's
    # per_expert_scale. The router's input transform (a scale-free RMSNorm times a
    # learned scale and D^-0.5) happens before the projection, in the MoE module.
    b, l, e = logits_BLE.shape
    r = softmax_topk(logits_BLE.reshape(b * l, e), bound=budget.bound, norm_topk_prob=True,
                     budget_T=budget.per_token_T(b, l), valid_T=valid_BL.reshape(-1),
                     platform=config.platform, allowed_TE=_allowed_TE(allowed_BE, b, l))
    scale_E1 = jnp.concatenate([params["per_expert_scale"].astype(jnp.float32),
                                jnp.zeros((1,), jnp.float32)])  # dropped slots (id E) stay 0
    return r.replace(weight_A=r.weight_A * scale_E1[r.expert_A])


# A router kind is a family's choice (``config.router``): its score function and rule.
# ``params`` are the router's own params besides the ``[D, E]`` projection (LLaDA2's
# float32 ``expert_bias``); ``ROUTER_PARAMS`` names them for the MoE module.
ROUTERS = {
    ("softmax_topk", "token_choice"): _softmax_token_choice,
    ("softmax_topk", "expert_choice"): _softmax_expert_choice,
    ("sigmoid_group_topk", "token_choice"): _sigmoid_token_choice,
    ("sigmoid_group_topk", "expert_choice"): _sigmoid_expert_choice,
    ("gemma_softmax_topk", "token_choice"): _gemma_token_choice,
}
ROUTER_PARAMS = {"softmax_topk": (), "sigmoid_group_topk": ("expert_bias",),
                 "gemma_softmax_topk": ("per_expert_scale",)}
# router params initialised to ones (the others to zeros)
ROUTER_PARAMS_ONES = ("per_expert_scale",)


def route(config, logits_BLE, params, valid_BL, budget: Budget, allowed_BE=None) -> Routing:
    """The ``Routing`` of one MoE layer: ``config.router`` under ``config.routing``.

    ``logits_BLE`` float32 router logits, ``params`` the router's extra params (a dict,
    ``ROUTER_PARAMS``), ``valid_BL`` real tokens (padding is never routed), ``budget``
    the call's ``Budget``, ``allowed_BE`` the block expert set of each sequence (bool
    ``[B, E]``, ``block_expert_set``; None: all experts). Per-token budgets or block
    sets under expert choice are a ValueError.
    """
    fn = ROUTERS.get((config.router, config.routing))
    if fn is None:
        raise ValueError(f"no router for router={config.router!r} with routing="
                         f"{config.routing!r}; known: {sorted(ROUTERS)}")
    if config.routing == "expert_choice" and budget.per_token is not None:
        raise ValueError("per-token experts_per_token budgets need routing='token_choice'; "
                         "routing='expert_choice' takes a scalar k only")
    if config.routing == "expert_choice" and allowed_BE is not None:
        raise ValueError("experts_per_block (block expert sets) needs routing='token_choice'")
    return fn(config, logits_BLE.astype(jnp.float32), params, valid_BL, budget, allowed_BE)
