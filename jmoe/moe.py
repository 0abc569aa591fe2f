"""The MoE block: route -> permute -> experts -> unpermute.

Shape letters: T tokens, D model dim, F expert ffn dim, E experts, K experts per
token, A assignments, C per-expert capacity (a bucket).

Expert backends all consume a ``routing.Routing`` and agree in float32:
  dense     every expert on every token, masked; the oracle.
  bucketed  assignments sorted by expert into ``[E, C, D]`` buffers and batched
            einsums; C is picked at run time (``lax.switch``) from static buckets
            by the real largest expert load, so nothing is ever dropped and the
            compute falls with the budgets. The CPU path.
  ragged    sorted rows and ``jax.lax.ragged_dot``; native on TPU, dense-expanded
            (slow) by XLA on CPU.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import routing as routing_lib
from jmoe.layers import default_init

log = logging.getLogger("jmoe")


def resolve_backend(backend: str) -> str:
    """``auto`` -> the fastest backend measured on this platform (see benchmarks)."""
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    # ragged_dot is native only on TPU; on CPU and GPU XLA expands it densely.
    return "ragged" if platform == "tpu" else "bucketed"


def swiglu_experts(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
    h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate_EDF))
    h = h * jnp.einsum("ECD,EDF->ECF", x_ECD, w_up_EDF)
    return jnp.einsum("ECF,EFD->ECD", h, w_down_EFD)


def combine(y_AD, r: routing_lib.Routing, num_tokens: int):
    """Weighted sum of assignment outputs into their tokens, ``[T, D]``."""
    y_AD = y_AD * r.weight_A[:, None].astype(y_AD.dtype)
    a = y_AD.shape[0]
    if a % num_tokens == 0 and r.token_major:
        # token-major layout (token choice): the K assignments of a token are adjacent
        return y_AD.reshape(num_tokens, a // num_tokens, -1).sum(1)
    return jax.ops.segment_sum(y_AD, r.token_A, num_segments=num_tokens)


def dense_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD):
    t = x_TD.shape[0]
    e = w_gate_EDF.shape[0]
    y_ETD = swiglu_experts(jnp.broadcast_to(x_TD, (e,) + x_TD.shape), w_gate_EDF, w_up_EDF,
                           w_down_EFD)
    # combine weights [T, E]; dropped assignments land in the sentinel column E
    w_TE = jnp.zeros((t, e + 1), jnp.float32).at[r.token_A, r.expert_A].add(r.weight_A)[:, :e]
    return jnp.einsum("ETD,TE->TD", y_ETD, w_TE.astype(y_ETD.dtype))


def capacity_buckets(num_assignments: int, num_tokens: int, num_experts: int) -> tuple[int, ...]:
    """Static capacities: x1.5 steps from 8 up to the dropless worst case.

    In token choice a token meets an expert at most once, so no expert ever holds
    more than min(T, A) assignments; the last bucket is that bound.
    """
    worst = min(num_tokens, num_assignments)
    caps, c = [], 8
    while c < worst:
        caps.append(c)
        c = int(math.ceil(c * 1.5 / 8) * 8)
    caps.append(worst)
    return tuple(caps)


def _sorted_slots(r):
    """Sort assignments by expert; return order, sorted expert ids and rank in group."""
    e = r.num_experts
    order = jnp.argsort(r.expert_A, stable=True)
    sorted_e = r.expert_A[order]
    counts = r.expert_counts()
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(order.shape[0], dtype=jnp.int32) - starts[jnp.minimum(sorted_e, e - 1)]
    return order, sorted_e, pos, counts


def bucketed_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, buckets=None):
    t, d = x_TD.shape
    e = r.num_experts
    a = r.expert_A.shape[0]
    buckets = buckets or capacity_buckets(a, t, e)
    order, sorted_e, pos, counts = _sorted_slots(r)
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])  # row T reads as zeros

    def run(cap):
        live = sorted_e < e
        slot_sorted = jnp.where(live, sorted_e * cap + pos, e * cap)  # dropped -> past the end
        slot_token = jnp.full((e * cap,), t, jnp.int32).at[slot_sorted].set(
            r.token_A[order], mode="drop")
        y_ECD = swiglu_experts(x_pad[slot_token].reshape(e, cap, d), w_gate_EDF, w_up_EDF,
                               w_down_EFD)
        y_pad = jnp.concatenate([y_ECD.reshape(e * cap, d), jnp.zeros((1, d), y_ECD.dtype)])
        slot_A = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted)
        return combine(y_pad[slot_A], r, t)

    which = jnp.searchsorted(jnp.asarray(buckets), counts.max(), side="left")
    return jax.lax.switch(jnp.minimum(which, len(buckets) - 1), [partial(run, c) for c in buckets])


def ragged_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD):
    t, d = x_TD.shape
    order, _, _, counts = _sorted_slots(r)
    xs_AD = x_TD[r.token_A[order]]
    h = jax.nn.silu(jax.lax.ragged_dot(xs_AD, w_gate_EDF, counts))
    h = h * jax.lax.ragged_dot(xs_AD, w_up_EDF, counts)
    ys_AD = jax.lax.ragged_dot(h, w_down_EFD, counts)  # rows past sum(counts) are zeros
    y_AD = jnp.zeros_like(ys_AD).at[order].set(ys_AD)
    return combine(y_AD, r, t)


EXPERT_BACKENDS = {
    "dense": dense_experts,
    "bucketed": bucketed_experts,
    "ragged": ragged_experts,
}


def expert_compute(backend: str, x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD):
    backend = resolve_backend(backend)
    if backend == "pallas":
        from pallas_kernels.moe_gmm import api as gmm_api

        return gmm_api.moe_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD)
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"moe_backend={backend!r}: expected one of {sorted(EXPERT_BACKENDS)}")
    return EXPERT_BACKENDS[backend](x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD)


class MoEBlock(nn.Module):
    """Softmax-routed sparse MoE of SwiGLU experts (OLMoE / LLaDA-MoE).

    Returns ``(y_BLD, aux)``; aux holds float32 router logits ``[B, L, E]``, the
    chosen expert ids / weights ``[B, L, K]``, per-expert token counts ``[E]``,
    the load-balancing loss and the number of routed (token, expert) pairs.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, valid_BL, budget_BL=None, k_max=None):
        b, l, d = x_BLD.shape
        e, f = self.num_experts, self.intermediate_size
        k_max = k_max or self.top_k
        router_DE = self.param("router", default_init, (d, e), self.dtype)
        w_gate_EDF = self.param("w_gate", default_init, (e, d, f), self.dtype)
        w_up_EDF = self.param("w_up", default_init, (e, d, f), self.dtype)
        w_down_EFD = self.param("w_down", default_init, (e, f, d), self.dtype)

        x_TD = x_BLD.reshape(b * l, d)
        valid_T = valid_BL.reshape(-1)
        logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32),
                               router_DE.astype(jnp.float32))
        budget_T = None if budget_BL is None else jnp.broadcast_to(budget_BL, (b, l)).reshape(-1)
        r = routing_lib.softmax_topk(logits_TE, k_max=k_max, norm_topk_prob=self.norm_topk_prob,
                                     budget_T=budget_T, valid_T=valid_T)
        y_TD = expert_compute(self.backend, x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD)
        aux = {
            "router_logits": logits_TE.reshape(b, l, e),
            "expert_ids": r.expert_A.reshape(b, l, k_max),
            "expert_weights": r.weight_A.reshape(b, l, k_max),
            "expert_counts": r.expert_counts(),
            "routed_pairs": r.live_A.sum(),
        }
        aux["lb_f"], aux["lb_p"] = routing_lib.load_balancing_stats(logits_TE, self.top_k, valid_T)
        return y_TD.reshape(b, l, d).astype(x_BLD.dtype), aux
