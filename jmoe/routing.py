"""Routers and assignment: token-choice top-k and masked per-token top-k.

Shape letters: T tokens (flattened B*L), E experts, K experts per token (a static
bound ``k_max``), A assignments. Router math is float32 throughout: in bfloat16,
ties between close scores change which experts are selected.

Every router returns one ``Routing``: a flat list of A (token, expert, weight)
assignments that every expert backend consumes. A dropped assignment (beyond a
token's budget, or a padding token) carries the sentinel expert id ``E``, so it
sorts after every live one and ``bincount(length=E)`` ignores it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Routing:
    token_A: jax.Array    # int32 [A]: the token row each assignment reads and writes
    expert_A: jax.Array   # int32 [A]: expert id, == num_experts when dropped
    weight_A: jax.Array   # float32 [A]: combine weight, 0 when dropped
    logits_TE: jax.Array  # float32 [T, E]: raw router logits (for capture and aux losses)
    num_experts: int = struct.field(pytree_node=False)
    # True when A = T*K with the K assignments of each token adjacent (token choice)
    token_major: bool = struct.field(pytree_node=False, default=True)

    @property
    def live_A(self):
        return self.expert_A < self.num_experts

    def expert_counts(self):
        """Tokens routed to each expert, ``[E]`` int32."""
        return jnp.bincount(self.expert_A, length=self.num_experts).astype(jnp.int32)


def check_budget(experts_per_token, k_max: int, num_experts: int):
    """Validate a concrete budget outside jit: a ValueError naming the bad value.

    Inside jit budgets cannot be inspected; they are clipped to ``[1, k_max]`` there.
    """
    if experts_per_token is None or isinstance(experts_per_token, jax.core.Tracer):
        return
    import numpy as np

    k = np.asarray(experts_per_token)
    if not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"experts_per_token must be integers, got dtype {k.dtype}")
    if k_max > num_experts:
        raise ValueError(f"max_experts={k_max} exceeds num_experts={num_experts}")
    if k.size and (k.min() < 1 or k.max() > k_max):
        bad = int(k.min()) if k.min() < 1 else int(k.max())
        raise ValueError(
            f"experts_per_token value {bad} is outside the allowed range 1..{k_max} "
            f"(max_experts={k_max}, num_experts={num_experts})")


def rank_mask(k_max: int, budget_T, valid_T):
    """``[T, K]`` bool: slot j of token t is live iff ``j < budget_t`` and t is valid."""
    t = valid_T.shape[0]
    if budget_T is None:
        live = jnp.ones((t, k_max), bool)
    else:
        budget = jnp.clip(jnp.broadcast_to(budget_T, (t,)), 1, k_max)
        live = jnp.arange(k_max)[None, :] < budget[:, None]
    return live & valid_T[:, None]


def softmax_topk(logits_TE, *, k_max: int, norm_topk_prob: bool, budget_T=None,
                 valid_T=None) -> Routing:
    """OLMoE token choice: softmax over all experts, keep the top-k_i of each token.

    Weights are the softmax probabilities of the kept experts, renormalised over
    the kept set when ``norm_topk_prob``. With every budget equal to ``k_max`` this
    is exactly plain top-k.
    """
    logits_TE = logits_TE.astype(jnp.float32)
    t, e = logits_TE.shape
    if valid_T is None:
        valid_T = jnp.ones((t,), bool)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    top_p_TK, top_e_TK = jax.lax.top_k(probs_TE, k_max)
    live_TK = rank_mask(k_max, budget_T, valid_T)
    w_TK = jnp.where(live_TK, top_p_TK, 0.0)
    if norm_topk_prob:
        w_TK = w_TK / jnp.maximum(w_TK.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    expert_TK = jnp.where(live_TK, top_e_TK, e).astype(jnp.int32)
    token_TK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k_max))
    return Routing(token_A=token_TK.reshape(-1), expert_A=expert_TK.reshape(-1),
                   weight_A=w_TK.reshape(-1), logits_TE=logits_TE, num_experts=e)


def load_balancing_stats(logits_TE, k: int, valid_T=None):
    """Per-layer terms of the Switch/OLMoE auxiliary loss, over valid tokens only.

    Returns ``(f_E, p_E)``: f the fraction of top-k assignments on each expert
    (summing to k), p the mean router probability of each expert. The loss over a
    model is ``E * sum(mean_layers(f) * mean_layers(p))``, as in transformers.
    """
    t, e = logits_TE.shape
    valid = jnp.ones((t,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    probs = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    _, top_e = jax.lax.top_k(probs, k)
    counts = jnp.zeros((e,), jnp.float32).at[top_e.reshape(-1)].add(jnp.repeat(valid, k))
    n = jnp.maximum(valid.sum(), 1.0)
    return counts / n, (probs * valid[:, None]).sum(0) / n


def load_balancing_loss(f_LE, p_LE):
    """``E * sum_e mean_l(f) * mean_l(p)`` from stacked per-layer stats ``[L, E]``."""
    e = f_LE.shape[-1]
    return e * jnp.sum(f_LE.mean(0) * p_LE.mean(0))
