"""The expert-parallel MoE: one ``shard_map`` with two ``all_to_all`` exchanges.

Shape letters: B batch, L sequence, T tokens, D model dim, E experts, K assignment
slots per token, A assignments, S expert shards (the mesh's ``expert`` axis size),
El = E/S experts per shard, Cs rows of one per-destination buffer. Suffix ``_l``
marks a per-device (local) size.

The router runs once per layer, outside the ``shard_map`` (on the whole batch, as
XLA partitions it); its ``Routing`` enters the ``shard_map`` in per-token form
(``Routing.per_token``: K = the budget bound for token choice, K = E for expert
choice), split over the devices with the tokens. Inside, each device:

  1. ``pack``           live assignments of its tokens into S buffers ``[S, Cs, D]``
                        (one per destination shard) plus local expert ids;
  2. ``all_to_all``     over ``expert``: shard s receives every device's buffer s;
  3. ``experts``        the expert compute (a function passed in: the MoE backend)
                        on the local expert slice ``[El, D, F]``;
  4. ``all_to_all``     back: results return to the devices holding their tokens;
  5. ``combine``        weighted sum of each token's results.

Token choice sends a token to its k_i chosen experts (budget-dropped assignments
carry the sentinel expert E and are never sent). Expert choice dispatches
expert -> token: the router gave each expert its chosen tokens; a token's row is
sent by the device holding it to the shards of the experts that picked it (0..E).

Buffer policy (``capacity_rows``): static shapes. ``ep_capacity_factor=None`` (the
default) sizes each buffer for the worst case, so nothing is ever dropped; a float
f sizes it to ``ceil(f * balanced load)`` and assignments past it are dropped (their
token keeps the other experts' outputs) and counted in ``aux["ep_dropped"]``.
``ragged_all_to_all`` would send only live rows, but XLA:CPU does not implement it,
so it is not used. Traffic per MoE layer and device: ``all_to_all_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe import routing as routing_lib
from jmoe.sharding import (DATA_AXIS, EXPERT_AXIS, axis_size, batch_spec,
                           check_experts_divisible)


@dataclasses.dataclass(frozen=True)
class EPPlan:
    """Static sizes of one expert-parallel MoE call (per device unless noted)."""

    shards: int             # S, the expert axis size
    experts_l: int          # El experts per shard
    batch_l: int            # sequences per data shard
    length: int             # padded sequence length (batch_l * length divisible by S)
    tokens_l: int           # T_l tokens a device holds
    expert_choice: bool
    capacity_factor: float | None
    token_axes: tuple       # mesh axes the token dim is split over, data first


def make_plan(mesh, b: int, l: int, num_experts: int, *, expert_choice: bool,
              capacity_factor: float | None) -> EPPlan:
    check_experts_divisible(num_experts, mesh)
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"ep_capacity_factor={capacity_factor!r}: expected None or > 0")
    s, dp = axis_size(mesh, EXPERT_AXIS), axis_size(mesh, DATA_AXIS)
    batch_l = -(-b // dp)
    step = s // math.gcd(batch_l, s)    # batch_l * length must split over the S devices
    length = -(-l // step) * step
    axes = tuple(a for a in (DATA_AXIS, EXPERT_AXIS) if a in mesh.axis_names)
    return EPPlan(shards=s, experts_l=num_experts // s, batch_l=batch_l, length=length,
                  tokens_l=batch_l * length // s, expert_choice=expert_choice,
                  capacity_factor=capacity_factor, token_axes=axes)


def capacity_rows(plan: EPPlan, k: int, capacity: int | None = None) -> int:
    """Rows Cs of one per-destination buffer, a static bound.

    ``k``: assignment slots per token (the budget bound). A device's live assignments
    to one shard are bounded by ``T_l * min(k, El)`` (a token meets an expert at most
    once); under expert choice also by the slots that shard's experts own in the data
    shard, ``B_l * El * C`` (``capacity`` = C, an expert's picks per sequence).
    ``None``: that worst case, dropless. A float f: ``ceil(f * balanced)``, balanced =
    the device's expected assignments per shard.
    """
    s, el, t = plan.shards, plan.experts_l, plan.tokens_l
    if plan.expert_choice:
        per_shard = plan.batch_l * el * capacity   # the data shard's slots of one shard
        worst = min(per_shard, t * el)
        balanced = per_shard / s                   # spread over the S token holders
    else:
        worst = t * min(k, el)
        balanced = t * k / s
    if plan.capacity_factor is None:
        return max(worst, 1)
    return max(1, min(worst, math.ceil(plan.capacity_factor * balanced)))


def pack(plan: EPPlan, x_TD, token_A, expert_A, keep_A, cap: int):
    """Per-destination buffers: ``send_SCD`` rows, ``send_e_SC`` local expert ids.

    Assignments are ranked within their destination shard in assignment order; one
    ranked >= ``cap`` is dropped. Returns the buffers, each assignment's slot in them
    (``S*cap`` = not sent) and the number dropped.
    """
    s, el = plan.shards, plan.experts_l
    t, d = x_TD.shape
    dest_A = jnp.where(keep_A, expert_A // el, s)          # s = not sent
    order = routing_lib.argsort_ids(dest_A, s)
    counts = jnp.bincount(dest_A, length=s + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(dest_A.shape[0]) - starts[dest_A[order]]
    rank_A = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    sent_A = keep_A & (rank_A < cap)
    slot_A = jnp.where(sent_A, dest_A * cap + rank_A, s * cap).astype(jnp.int32)
    slot_token = jnp.full((s * cap,), t, jnp.int32).at[slot_A].set(token_A, mode="drop")
    slot_e = jnp.full((s * cap,), el, jnp.int32).at[slot_A].set(expert_A % el, mode="drop")
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])  # row t reads as zeros
    send_SCD = x_pad[slot_token].reshape(s, cap, d)
    dropped = jnp.sum(keep_A & ~sent_A).astype(jnp.int32)
    return send_SCD, slot_e.reshape(s, cap), slot_A, dropped


def all_to_all(buf_S):
    """Exchange over the expert axis: block s of the result came from shard s."""
    return jax.lax.all_to_all(buf_S, EXPERT_AXIS, 0, 0, tiled=True)


def local_experts(experts: Callable, recv_SCD, recv_e_SC, weights):
    """The local experts on every received row (id El = an empty row), with weight 1."""
    s, cap, d = recv_SCD.shape
    el = weights[0].shape[0]
    rows = s * cap
    r = routing_lib.Routing(
        token_A=jnp.arange(rows, dtype=jnp.int32), expert_A=recv_e_SC.reshape(rows),
        weight_A=jnp.ones((rows,), jnp.float32), num_experts=el, num_tokens=rows)
    return experts(recv_SCD.reshape(rows, d), r, *weights).reshape(s, cap, d)


def combine(back_SCD, slot_A, token_A, weight_A, num_tokens: int):
    """Each token's weighted sum of its returned expert outputs, ``[T_l, D]``."""
    s, cap, d = back_SCD.shape
    y_pad = jnp.concatenate([back_SCD.reshape(s * cap, d), jnp.zeros((1, d), back_SCD.dtype)])
    y_AD = y_pad[slot_A] * weight_A[:, None].astype(back_SCD.dtype)
    return jax.ops.segment_sum(y_AD, token_A, num_segments=num_tokens)


def _ep_body(plan: EPPlan, experts: Callable, cap: int, num_experts: int, x_TD, ids_TK, w_TK,
             *weights):
    t, k = ids_TK.shape
    token_A = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    expert_A, weight_A = ids_TK.reshape(-1), w_TK.reshape(-1)
    keep_A = expert_A < num_experts
    send_SCD, send_e_SC, slot_A, dropped = pack(plan, x_TD, token_A, expert_A, keep_A, cap)
    recv_SCD, recv_e_SC = all_to_all(send_SCD), all_to_all(send_e_SC)
    y_SCD = local_experts(experts, recv_SCD, recv_e_SC, weights)
    y_TD = combine(all_to_all(y_SCD), slot_A, token_A, weight_A, plan.tokens_l)
    return y_TD.astype(x_TD.dtype), jax.lax.psum(dropped, plan.token_axes)


def expert_parallel_moe(mesh, x_BLD, r: routing_lib.Routing, weights, *, experts: Callable,
                        capacity_factor: float | None = None):
    """The routed-expert output ``y_BLD`` and the dropped-assignment count, expert-parallel.

    ``r`` is the layer's ``Routing`` over the ``B*L`` tokens of ``x_BLD`` (computed once,
    outside), ``weights`` the expert weights ``(w_gate_EDF, w_up_EDF, w_down_EFD)``
    sharded over ``expert``, and ``experts(x_TD, routing, *weights) -> y_TD`` the expert
    compute run on each shard's experts (a ``jmoe.moe`` backend). Batch and length
    are padded (with empty assignment slots) to split evenly and cut off again. Equal
    to the single-device expert compute up to float rounding when nothing is dropped.
    """
    b, l, d = x_BLD.shape
    e = r.num_experts
    ec = not r.token_major
    plan = make_plan(mesh, b, l, e, expert_choice=ec, capacity_factor=capacity_factor)
    ids_TK, w_TK = r.per_token()
    k = ids_TK.shape[-1]
    cap = capacity_rows(plan, k, (r.max_load // b) if ec else None)
    pb, pl = plan.batch_l * axis_size(mesh, DATA_AXIS) - b, plan.length - l

    def pad(a_BL, fill=0):  # [B, L, ...] -> padded, flattened to tokens
        a = a_BL
        widths = [(0, pb), (0, pl)] + [(0, 0)] * (a.ndim - 2)
        return jnp.pad(a, widths, constant_values=fill).reshape((-1,) + a.shape[2:])

    tok, wspec = P(plan.token_axes), P(EXPERT_AXIS)
    body = lambda *args: _ep_body(plan, experts, cap, e, *args)
    # check_vma=False: pallas_call's output shapes carry no varying-axis annotation
    y_TD, dropped = jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, tok) + (wspec,) * len(weights),
        out_specs=(tok, P()), check_vma=False)(pad(x_BLD), pad(ids_TK.reshape(b, l, k), e),
                                               pad(w_TK.reshape(b, l, k)), *weights)
    y_BLD = y_TD.reshape(b + pb, l + pl, d)[:b, :l]
    y_BLD = jax.lax.with_sharding_constraint(y_BLD, NamedSharding(mesh, batch_spec(mesh, b)))
    return y_BLD, dropped


def all_to_all_bytes(config, batch: int, length: int, mesh, k: int | None = None) -> int:
    """Bytes one device sends through ``all_to_all`` per MoE layer, both directions.

    ``2 * S * Cs * D * itemsize`` (rows there and back) ``+ S * Cs * 4`` (expert ids),
    with Cs from ``capacity_rows``; a fraction (S-1)/S leaves the device.
    """
    e, k = config.num_experts, k or config.num_experts_per_tok
    ec = config.routing == "expert_choice"
    plan = make_plan(mesh, batch, length, e, expert_choice=ec,
                     capacity_factor=config.ep_capacity_factor)
    c = routing_lib.expert_capacities(length, k, e, config.capacity_factor)[-1] if ec else None
    cap, s = capacity_rows(plan, k, c), plan.shards
    item = jnp.dtype(config.dtype).itemsize
    return 2 * s * cap * config.hidden_size * item + s * cap * 4
