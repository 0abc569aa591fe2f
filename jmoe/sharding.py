"""Meshes, logical-axis rules, param placement and the expert-parallel MoE.

Shape letters: B batch, L sequence, T tokens, D model dim, F expert ffn dim, E
experts, A assignments, S expert shards (the mesh's ``expert`` axis size), El = E/S
experts per shard, Cs rows of one per-destination buffer, R = S*Cs rows a shard
receives. Suffix ``_l`` marks a per-device (local) size.

Placement (``DEFAULT_RULES``): routed-expert weights ``[E, ...]`` on the ``expert``
axis, batch on ``data``, everything else replicated. A config carrying a mesh
(``config.mesh``, set by ``jmoe.load(path, mesh=mesh)`` or ``shard_model``) whose
``expert`` axis is > 1 runs every MoE layer expert-parallel, in one ``shard_map``:

  1. ``route_local``      each device routes its own tokens (batch split over ``data``,
                          each data shard's tokens split over ``expert``); expert
                          choice first all-gathers the data shard's router logits,
                          since an expert picks among a whole sequence's tokens.
  2. ``pack``             live assignments of the device's tokens into S buffers
                          ``[S, Cs, D]`` (one per destination shard) + local expert ids.
  3. ``all_to_all``       over ``expert``: shard s receives every device's buffer s.
  4. ``local_experts``    ``jmoe.moe.expert_compute`` (same backends) on the local
                          expert slice ``[El, D, F]``.
  5. ``all_to_all``       back: results return to the devices holding their tokens.
  6. ``combine``          weighted sum of each token's results.

Token choice sends a token to its k_i chosen experts (budget-dropped assignments
carry the sentinel expert E and are never sent). Expert choice dispatches
expert -> token: the router gives each expert its chosen tokens (expert-major
slots); each slot's token row is packed by the device that holds the token and
sent to the shard holding the expert, so a token goes wherever (0..E experts) it
was picked; the result comes back to the token's device.

Buffer policy (``capacity_rows``): static shapes. ``ep_capacity_factor=None`` (the
default) sizes each buffer for the worst case, so nothing is ever dropped;
a float f sizes it to ``ceil(f * balanced load)`` and assignments past it are
dropped (their token keeps the other experts' outputs) and counted in
``aux["ep_dropped"]``. ``ragged_all_to_all`` would send only live rows, but XLA:CPU
does not implement it, so it is not used. Traffic per MoE layer and device:
``all_to_all_bytes``.

The aux statistics (router logits, expert ids, counts) come from the same router
run on the whole batch outside the ``shard_map``: cheap (``[T, E]``) and identical
to the single-device aux by construction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe import routing as routing_lib

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
# logical axis -> mesh axis; a logical axis without a rule is replicated
DEFAULT_RULES = (("batch", DATA_AXIS), ("expert", EXPERT_AXIS))
# routed-expert weight leaves (under a ``moe`` module; shared experts are 2-D and replicated)
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def make_mesh(data: int = 1, expert: int | None = None, *, devices=None):
    """A ``(data, expert)`` mesh over the available devices (all hosts' under ``jax.distributed``).

    ``expert`` defaults to ``len(devices) // data``; ``data * expert`` must equal the
    number of devices. Axes are ``Auto`` so unsharded inputs still enter jit.

    Example:
        mesh = jmoe.make_mesh(data=2, expert=4)
        model = jmoe.load("ckpt/olmoe", mesh=mesh)
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not (isinstance(data, int) and data >= 1 and n % data == 0):
        raise ValueError(f"make_mesh data={data!r}: expected a positive divisor of the "
                         f"{n} available devices")
    expert = n // data if expert is None else expert
    if not (isinstance(expert, int) and expert >= 1 and data * expert == n):
        raise ValueError(f"make_mesh data={data} x expert={expert!r} = "
                         f"{data * expert if isinstance(expert, int) else '?'} devices: "
                         f"expected data * expert == {n} available devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, expert), (DATA_AXIS, EXPERT_AXIS), axis_types=auto,
                         devices=devices)


def axis_size(mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1)) if mesh is not None else 1


def expert_parallel_active(mesh) -> bool:
    """True when ``mesh`` has an ``expert`` axis of size > 1."""
    return axis_size(mesh, EXPERT_AXIS) > 1


def check_experts_divisible(num_experts: int, mesh) -> None:
    s = axis_size(mesh, EXPERT_AXIS)
    if num_experts % s:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the mesh's expert axis size {s}: "
            f"each shard must hold the same number of experts; pick expert= one of {divisors}")


# -- logical-axis rules and param placement ---------------------------------------------------

def logical_to_spec(logical_axes, mesh, rules=DEFAULT_RULES) -> P:
    """``PartitionSpec`` for logical axis names (None = replicated) under ``rules``."""
    table = dict(rules)
    names = set(mesh.axis_names)
    return P(*[table.get(a) if a is not None and table.get(a) in names else None
               for a in logical_axes])


def param_logical_axes(path, leaf) -> tuple:
    """Logical axes of one params leaf: routed-expert weights are ``("expert", None, None)``."""
    keys = [getattr(k, "key", str(k)) for k in path]
    ndim = len(leaf.shape)
    if keys and keys[-1] in EXPERT_WEIGHTS and "moe" in keys and ndim == 3:
        return ("expert", None, None)
    return (None,) * ndim


def param_specs(params, mesh, rules=DEFAULT_RULES):
    """The ``PartitionSpec`` of every params leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: logical_to_spec(param_logical_axes(p, x), mesh, rules), params)


def param_shardings(params, mesh, rules=DEFAULT_RULES):
    """The ``NamedSharding`` of every params leaf (arrays or ``ShapeDtypeStruct``s).

    Raises a ValueError naming the sizes when the experts do not split evenly.
    """
    def place(x, spec):
        if spec and spec[0] == EXPERT_AXIS:
            check_experts_divisible(x.shape[0], mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(place, params, param_specs(params, mesh, rules))


def shard_params(params, mesh, rules=DEFAULT_RULES):
    """``device_put`` params onto ``mesh``: experts on ``expert``, the rest replicated."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_spec(mesh, b: int, rules=DEFAULT_RULES) -> P:
    """The ``batch`` rule's spec for a batch of ``b`` (replicated when b does not split)."""
    spec = logical_to_spec(("batch",), mesh, rules)
    axis = spec[0] if len(spec) else None
    return spec if axis is not None and b % axis_size(mesh, axis) == 0 else P()


def shard_batch(x_B, mesh, rules=DEFAULT_RULES):
    """``device_put`` a batch-leading array (tokens, masks, budgets) by the ``batch`` rule."""
    return jax.device_put(x_B, NamedSharding(mesh, batch_spec(mesh, np.shape(x_B)[0], rules)))


def shard_model(model, mesh, **config_overrides):
    """The model on ``mesh``: params placed by ``DEFAULT_RULES``, ``config.mesh`` set
    (``config_overrides`` too, e.g. ``ep_capacity_factor=1.25``).

    Example:
        model = jmoe.sharding.shard_model(jmoe.random_model(cfg), jmoe.make_mesh(expert=8))
    """
    config = model.config.replace(mesh=mesh, **config_overrides)
    return model.replace(config=config, params=shard_params(model.params, mesh))


# -- the expert-parallel MoE ------------------------------------------------------------------

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


def capacity_rows(plan: EPPlan, num_assignments: int) -> int:
    """Rows Cs of one per-destination buffer, a static bound.

    A device's live assignments to one shard are bounded by the slots that shard's
    experts own (token choice: all of the device's A assignments; expert choice:
    A_d/S of the data shard's A_d slots) and by ``T_l * min(k, El)`` (a token meets
    an expert at most once). ``None``: that worst case, dropless. A float f:
    ``ceil(f * balanced)``, balanced = the device's expected assignments per shard.
    """
    s, el, t = plan.shards, plan.experts_l, plan.tokens_l
    if plan.expert_choice:
        per_shard = num_assignments // s   # the data shard's slots of one shard's experts
        worst = min(per_shard, t * el)
        balanced = per_shard / s           # those slots spread over the S token holders
    else:
        k = num_assignments // t
        worst = min(num_assignments, t * min(k, el))
        balanced = num_assignments / s
    if plan.capacity_factor is None:
        return max(worst, 1)
    return max(1, min(worst, math.ceil(plan.capacity_factor * balanced)))


def route_local(plan: EPPlan, logits_TE, valid_T, budget_T, route_fn, route_params):
    """Route this device's tokens; return ``(token_A, expert_A, weight_A, keep_A)``.

    token_A indexes the device's own ``T_l`` tokens; keep_A marks live assignments of
    those tokens. Token choice routes the local tokens alone (per-token routing);
    expert choice all-gathers the data shard's logits (each expert picks among whole
    sequences) and keeps the slots whose token this device holds.
    """
    if not plan.expert_choice:
        budget = None if budget_T is None else budget_T[None, :]
        r = route_fn(logits_TE, valid_T[None, :], budget, route_params)
        return r.token_A, r.expert_A, r.weight_A, r.live_A
    gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
    logits_dE, valid_d = gather(logits_TE), gather(valid_T)
    r = route_fn(logits_dE, valid_d.reshape(plan.batch_l, plan.length), None, route_params)
    start = jax.lax.axis_index(EXPERT_AXIS) * plan.tokens_l
    mine = (r.token_A >= start) & (r.token_A < start + plan.tokens_l)
    token_A = jnp.clip(r.token_A - start, 0, plan.tokens_l - 1)
    return token_A, r.expert_A, r.weight_A, r.live_A & mine


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


def local_experts(backend: str, recv_SCD, recv_e_SC, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The local experts on every received row (id El = an empty row), with weight 1."""
    from jmoe import moe

    s, cap, d = recv_SCD.shape
    el = w_gate_EDF.shape[0]
    rows = s * cap
    r = routing_lib.Routing(
        token_A=jnp.arange(rows, dtype=jnp.int32), expert_A=recv_e_SC.reshape(rows),
        weight_A=jnp.ones((rows,), jnp.float32), logits_TE=jnp.zeros((rows, el), jnp.float32),
        num_experts=el)
    y_RD = moe.expert_compute(backend, recv_SCD.reshape(rows, d), r, w_gate_EDF, w_up_EDF,
                              w_down_EFD)
    return y_RD.reshape(s, cap, d)


def combine(back_SCD, slot_A, token_A, weight_A, num_tokens: int):
    """Each token's weighted sum of its returned expert outputs, ``[T_l, D]``."""
    s, cap, d = back_SCD.shape
    y_pad = jnp.concatenate([back_SCD.reshape(s * cap, d), jnp.zeros((1, d), back_SCD.dtype)])
    y_AD = y_pad[slot_A] * weight_A[:, None].astype(back_SCD.dtype)
    return jax.ops.segment_sum(y_AD, token_A, num_segments=num_tokens)


def _ep_body(plan: EPPlan, backend: str, route_fn, x_TD, logits_TE, valid_T, budget_T,
             route_params, w_gate_EDF, w_up_EDF, w_down_EFD):
    token_A, expert_A, weight_A, keep_A = route_local(plan, logits_TE, valid_T, budget_T,
                                                      route_fn, route_params)
    cap = capacity_rows(plan, expert_A.shape[0])
    send_SCD, send_e_SC, slot_A, dropped = pack(plan, x_TD, token_A, expert_A, keep_A, cap)
    recv_SCD, recv_e_SC = all_to_all(send_SCD), all_to_all(send_e_SC)
    y_SCD = local_experts(backend, recv_SCD, recv_e_SC, w_gate_EDF, w_up_EDF, w_down_EFD)
    y_TD = combine(all_to_all(y_SCD), slot_A, token_A, weight_A, plan.tokens_l)
    return y_TD.astype(x_TD.dtype), jax.lax.psum(dropped, plan.token_axes)


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


def expert_parallel_moe(mesh, x_BLD, logits_BLE, valid_BL, budget_BL, w_gate_EDF, w_up_EDF,
                        w_down_EFD, *, route_fn: Callable, route_params: Any = None,
                        backend: str = "auto", expert_choice: bool = False,
                        capacity_factor: float | None = None):
    """The routed-expert output ``y_BLD`` and the dropped-assignment count, expert-parallel.

    ``route_fn(logits_TE, valid_BL, budget_BL, route_params) -> Routing`` is the
    block's router (token choice: called on each device's tokens as one row; expert
    choice: on the data shard's ``[B_l, L]`` sequences, budget None). Batch and
    length are padded (with invalid tokens, which routing never takes) to split
    evenly; the padding is cut off again. Equal to ``jmoe.moe.expert_compute`` on one
    device up to float rounding when nothing is dropped.
    """
    b, l, d = x_BLD.shape
    e = logits_BLE.shape[-1]
    plan = make_plan(mesh, b, l, e, expert_choice=expert_choice,
                     capacity_factor=capacity_factor)
    pb, pl = plan.batch_l * axis_size(mesh, DATA_AXIS) - b, plan.length - l

    def pad(a, fill=0):
        widths = [(0, pb), (0, pl)] + [(0, 0)] * (a.ndim - 2)
        return jnp.pad(a, widths, constant_values=fill).reshape((-1,) + a.shape[2:])

    route_params = {} if route_params is None else route_params
    tok = P(plan.token_axes)
    args = [pad(x_BLD), pad(logits_BLE.astype(jnp.float32)), pad(valid_BL, False)]
    specs = [tok, tok, tok]
    if budget_BL is not None:
        args.append(pad(jnp.broadcast_to(jnp.asarray(budget_BL, jnp.int32), (b, l)), 1))
        specs.append(tok)
    wspec = P(EXPERT_AXIS)
    args += [route_params, w_gate_EDF, w_up_EDF, w_down_EFD]
    specs += [jax.tree.map(lambda _: P(), route_params), wspec, wspec, wspec]

    def body(x, logits, valid, *rest):
        budget, rest = (rest[0], rest[1:]) if budget_BL is not None else (None, rest)
        return _ep_body(plan, backend, route_fn, x, logits, valid, budget, *rest)

    # check_vma=False: pallas_call's output shapes carry no varying-axis annotation
    y_TD, dropped = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                                  out_specs=(tok, P()), check_vma=False)(*args)
    y_BLD = y_TD.reshape(b + pb, l + pl, d)[:b, :l]
    y_BLD = jax.lax.with_sharding_constraint(y_BLD, NamedSharding(mesh, batch_spec(mesh, b)))
    return y_BLD, dropped


def all_to_all_bytes(config, batch: int, length: int, mesh, k: int | None = None) -> int:
    """Bytes one device sends through ``all_to_all`` per MoE layer, both directions.

    ``2 * S * Cs * D * itemsize`` (rows there and back) ``+ S * Cs * 4`` (expert ids),
    with Cs from ``capacity_rows``; a fraction (S-1)/S leaves the device. Expert
    choice adds the all-gathered router logits, ``(S-1) * T_l * (4E + 1)`` bytes.
    """
    e, k = config.num_experts, k or config.num_experts_per_tok
    ec = config.routing == "expert_choice"
    plan = make_plan(mesh, batch, length, e, expert_choice=ec,
                     capacity_factor=config.ep_capacity_factor)
    if ec:
        c = routing_lib.expert_capacities(plan.length, k, e, config.capacity_factor)[-1]
        assignments = plan.batch_l * e * c
    else:
        assignments = plan.tokens_l * k
    cap, s = capacity_rows(plan, assignments), plan.shards
    item = jax.numpy.dtype(config.dtype).itemsize
    total = 2 * s * cap * config.hidden_size * item + s * cap * 4
    return total + ((s - 1) * plan.tokens_l * (4 * e + 1) if ec else 0)
