"""The MoE block: route -> permute -> experts -> unpermute.

Shape letters: T tokens, D model dim, F expert ffn dim, E experts, K experts per
token, A assignments, C per-expert capacity (a bucket).

Expert backends all consume a ``routing.Routing`` and agree in float32:
  dense     every expert on every token, masked; the oracle.
  bucketed  assignments sorted by expert into ``[E, C, D]`` buffers and batched
            einsums; C is picked at run time (``lax.switch``) from static buckets
            by the real loads (the few hottest experts spill into a small overflow
            buffer), so nothing is ever dropped and the compute falls with the
            budgets. The GPU path, and the CPU one where ``cpu_gmm`` cannot be built.
  ragged    sorted rows and ``jax.lax.ragged_dot``; native on TPU, dense-expanded
            (slow) by XLA on CPU.
  pallas    ``pallas_kernels.moe_gmm``: a grouped-matmul kernel that skips dropped rows.
  cpu_gmm   ``jmoe.cpu_kernels``: a compiled C++ grouped-matmul kernel (XLA FFI) in
            which each expert computes exactly its rows; float32 or bfloat16, CPU
            only. The CPU path.
  auto      per platform (``resolve_backend``), logged once and reported in aux.

Token choice and expert choice give the same ``Routing`` type, so every backend
serves both; only the static bound on an expert's load differs (``Routing.load_bound``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import cpu_kernels
from jmoe import expert_parallel
from jmoe import routing as routing_lib
from jmoe.layers import SwiGLU, logical_init
from jmoe.platform import kernels
from jmoe.routing import combine
from jmoe.sharding import expert_parallel_active



def resolve_backend(backend: str, dtype=None, platform: str | None = None) -> str:
    """``auto`` -> the backend measured fastest for the target ``platform``
    (``jmoe.platform.kernels``): TPU ``ragged``; CPU ``cpu_gmm`` when its kernel builds
    and ``dtype`` (the model's, if given) is float32 or bfloat16, else ``bucketed``;
    GPU and an unknown platform (None) ``bucketed``. Logged once (INFO, ``jmoe``
    logger); ``jmoe.forward`` reports it as ``aux["moe_backend"]``."""
    return kernels(platform).moe_backend(backend, dtype)


# the routed experts' gate activation, a family's choice (``config.expert_activation``):
# SwiGLU experts (OLMoE, LLaDA2) or GeGLU with tanh-approximated GELU (DiffusionGemma)
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def swiglu_experts(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, act=jax.nn.silu):
    """Gated experts ``down(act(x @ gate) * (x @ up))`` on ``[E, C, D]`` buffers."""
    h = act(jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate_EDF))
    h = h * jnp.einsum("ECD,EDF->ECF", x_ECD, w_up_EDF)
    return jnp.einsum("ECF,EFD->ECD", h, w_down_EFD)


def dense_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, act=jax.nn.silu):
    t = x_TD.shape[0]
    e = w_gate_EDF.shape[0]
    y_ETD = swiglu_experts(jnp.broadcast_to(x_TD, (e,) + x_TD.shape), w_gate_EDF, w_up_EDF,
                           w_down_EFD, act)
    # combine weights [T, E]; dropped assignments land in the sentinel column E
    w_TE = jnp.zeros((t, e + 1), jnp.float32).at[r.token_A, r.expert_A].add(r.weight_A)[:, :e]
    return jnp.einsum("ETD,TE->TD", y_ETD, w_TE.astype(y_ETD.dtype))


BUCKET_GROWTH = 1.25  # padding waste <= 25%; each bucket is one more compiled branch


def capacity_buckets(num_assignments: int, num_tokens: int, num_experts: int,
                     max_load: int | None = None, growth: float | None = None) -> tuple[int, ...]:
    """Static capacities (multiples of 8) from 8 up to the dropless worst case.

    A token meets an expert at most once (token choice: distinct top-k; expert
    choice: an expert picks distinct positions), so no expert ever holds more than
    min(T, A) assignments; expert choice bounds it further by B*C (``max_load``).
    The last bucket is that bound, so the largest real load always fits.

    Steps are x``growth``, except between half and twice the mean load A/E, where
    real loads land: there they are ~1/8 of the mean (a fine step costs a compiled
    branch, a coarse one pads every expert).
    """
    worst = min(num_tokens, num_assignments)
    if max_load is not None:
        worst = min(worst, max_load)
    worst = max(worst, 1)
    growth = growth or BUCKET_GROWTH
    mean = num_assignments / num_experts
    fine = max(8, int(math.ceil(mean / 64)) * 8)
    caps, c = [], 8
    while c < worst:
        caps.append(c)
        if mean / 2 <= c < 2 * mean:
            c += fine
        else:
            c = max(c + 8, int(math.ceil(c * growth / 8) * 8))
    caps.append(worst)
    return tuple(caps)


def _sorted_slots(r):
    """Sort assignments by expert; return order, sorted expert ids and rank in group."""
    e = r.num_experts
    order = routing_lib.argsort_ids(r.expert_A, e)
    sorted_e = r.expert_A[order]
    counts = r.expert_counts()
    starts = jnp.cumsum(counts) - counts
    pos = jnp.arange(order.shape[0], dtype=jnp.int32) - starts[jnp.minimum(sorted_e, e - 1)]
    return order, sorted_e, pos, counts


def overflow_buckets(worst: int) -> tuple[int, ...]:
    """Static overflow capacities: 0 (no overflow), steps of 8 to 32, then x2 steps to ``worst``."""
    caps, c = [0], 8
    while c < worst:
        caps.append(c)
        c = c + 8 if c < 32 else c * 2
    caps.append(max(worst, 1))
    return tuple(caps)


def bucket_index(counts_E, buckets):
    """Index of the smallest bucket holding the largest expert load (the last if none does)."""
    # buckets are sorted: the count of those below the load is its left insertion
    # index (one vector op; jnp.searchsorted lowers to a while loop on CPU)
    which = jnp.sum(jnp.asarray(buckets) < jnp.max(counts_E)).astype(jnp.int32)
    return jnp.minimum(which, len(buckets) - 1)


def capacity_plan(counts_E, buckets, over_buckets, num_hot: int):
    """Pick the base capacity for all experts and the overflow capacity for the hottest.

    The base bucket holds the (num_hot+1)-th largest load, so only the ``num_hot``
    most loaded experts can have rows past it; those rows go to an overflow buffer
    sized by the largest excess. A hot expert then costs num_hot overflow rows per
    extra token instead of E padded rows. Returns ``(base index, overflow index,
    hot expert ids [num_hot])``.
    """
    e = counts_E.shape[0]
    top, hot_ids = jax.lax.top_k(counts_E, min(num_hot + 1, e))
    base_load = top[num_hot] if num_hot < e else jnp.zeros((), counts_E.dtype)
    i_base = bucket_index(base_load, buckets)
    excess = jnp.maximum(top[0] - jnp.asarray(buckets)[i_base], 0)
    return i_base, bucket_index(excess, over_buckets), hot_ids[:num_hot]


def _slot_compute(x_pad, r, slot_A, groups, cap, w_gate, w_up, w_down, act=jax.nn.silu):
    """Assignments into slots ``slot_A`` (>= groups*cap: not in this buffer), SwiGLU on
    the ``[groups, cap, D]`` buffer, and their weighted outputs summed per token ``[T, D]``.

    Empty slots read the zero row T of ``x_pad``. Token-major routings (token choice)
    combine with a gather (each token reads its K slots), others with a scatter-add.
    """
    t1, d = x_pad.shape
    t = t1 - 1
    slot_token = jnp.full((groups * cap,), t, jnp.int32).at[slot_A].set(r.token_A, mode="drop")
    y_GCD = swiglu_experts(x_pad[slot_token].reshape(groups, cap, d), w_gate, w_up, w_down,
                           act)
    y_SD = y_GCD.reshape(groups * cap, d)
    a = slot_A.shape[0]
    if r.token_major and a % t == 0:
        y_SD = jnp.concatenate([y_SD, jnp.zeros((1, d), y_SD.dtype)])  # row for "not here"
        y_AD = y_SD[jnp.minimum(slot_A, groups * cap)] * r.weight_A[:, None].astype(y_SD.dtype)
        return y_AD.reshape(t, a // t, d).sum(1)
    slot_w = jnp.zeros((groups * cap,), jnp.float32).at[slot_A].set(r.weight_A, mode="drop")
    y_SD = y_SD * slot_w[:, None].astype(y_SD.dtype)
    return jnp.zeros((t1, d), y_SD.dtype).at[slot_token].add(y_SD)[:t]


def bucketed_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, act=jax.nn.silu, buckets=None,
                     num_hot=None):
    """Per-expert buffers ``[E, C, D]`` plus an overflow ``[H, C_o, D]`` for the hottest experts.

    C is the smallest static bucket holding the (H+1)-th largest load and C_o the
    smallest overflow bucket holding the largest load's excess over C (0 when the
    loads are balanced), both picked at run time with ``lax.switch``, so nothing is
    ever dropped and the compute (E*C + H*C_o rows) falls with the budgets and does
    not blow up when a few experts are hot. Each assignment's slot comes from its
    rank among the assignments of its expert (a stable sort); then gather the slot
    rows, batched SwiGLU einsums, and combine into the tokens. H defaults to
    max(1, E // 4) (measured on a random OLMoE router: E*C + H*C_o ~1.3x the real
    rows, against ~1.5x with E // 8).
    """
    t, d = x_TD.shape
    e = r.num_experts
    a = r.expert_A.shape[0]
    buckets = buckets or capacity_buckets(a, t, e, r.load_bound())
    h = min(e, num_hot or max(1, e // 4))
    over = overflow_buckets(max(buckets[-1] - buckets[0], 1))
    order, _, pos_sorted, counts = _sorted_slots(r)
    pos_A = jnp.zeros_like(pos_sorted).at[order].set(pos_sorted)  # rank within its expert
    live = r.live_A
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, d), x_TD.dtype)])  # row T reads as zeros
    i_base, i_over, hot_ids = capacity_plan(counts, buckets, over, h)
    cap_base = jnp.asarray(buckets)[i_base]

    def run_base(cap):
        slot = jnp.where(live & (pos_A < cap), r.expert_A * cap + pos_A, e * cap)
        return _slot_compute(x_pad, r, slot, e, cap, w_gate_EDF, w_up_EDF, w_down_EFD, act)

    def run_over(cap):
        if cap == 0:
            return jnp.zeros((t, d), x_TD.dtype)
        hot_rank = jnp.full((e + 1,), h, jnp.int32).at[hot_ids].set(jnp.arange(h, dtype=jnp.int32))
        rank, opos = hot_rank[r.expert_A], pos_A - cap_base
        slot = jnp.where(live & (opos >= 0) & (rank < h), rank * cap + opos, h * cap)
        return _slot_compute(x_pad, r, slot, h, cap,
                             w_gate_EDF[hot_ids], w_up_EDF[hot_ids], w_down_EFD[hot_ids], act)

    y = jax.lax.switch(i_base, [partial(run_base, c) for c in buckets])
    return y + jax.lax.switch(i_over, [partial(run_over, c) for c in over]).astype(y.dtype)


def ragged_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, act=jax.nn.silu):
    t, d = x_TD.shape
    order, _, _, counts = _sorted_slots(r)
    xs_AD = x_TD[r.token_A[order]]
    h = act(jax.lax.ragged_dot(xs_AD, w_gate_EDF, counts))
    h = h * jax.lax.ragged_dot(xs_AD, w_up_EDF, counts)
    ys_AD = jax.lax.ragged_dot(h, w_down_EFD, counts)  # rows past sum(counts) are zeros
    y_AD = jnp.zeros_like(ys_AD).at[order].set(ys_AD)
    return combine(y_AD, r)


def cpu_gmm_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, activation: str = "silu"):
    """The assignments through ``jmoe.cpu_kernels``' compiled kernel: it groups them by
    expert, each expert computes exactly its live rows, and (token choice) sums each
    token's weighted rows; expert choice combines with a segment sum.

    float32 arithmetic on float32 or bfloat16 arrays (all bfloat16 stay bfloat16 in
    memory; other mixes are cast to float32); the gradient is the ``bucketed``
    backend's (the same function), recomputed in the backward pass.
    """
    dtype = x_TD.dtype
    arrays = (x_TD, w_gate_EDF, w_up_EDF, w_down_EFD)
    # the kernel reads float32 or bfloat16 (all alike); anything else computes in float32
    same = jnp.bfloat16 if all(a.dtype == jnp.bfloat16 for a in arrays) else jnp.float32
    x, wg, wu, wd = (a.astype(same) for a in arrays)
    meta = (r.num_experts, r.num_tokens, r.token_major, r.max_load, activation)
    y = _cpu_gmm(meta, x, r.weight_A.astype(jnp.float32), wg, wu, wd, r.token_A, r.expert_A)
    return y.astype(dtype)


def _meta_routing(meta, token_A, expert_A, weight_A):
    e, t, token_major, max_load, _ = meta
    return routing_lib.Routing(token_A=token_A, expert_A=expert_A, weight_A=weight_A,
                               num_experts=e, num_tokens=t, token_major=token_major,
                               max_load=max_load)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cpu_gmm(meta, x_TD, weight_A, w_gate_EDF, w_up_EDF, w_down_EFD, token_A, expert_A):
    r = _meta_routing(meta, token_A, expert_A, weight_A)
    t, a = x_TD.shape[0], r.token_A.shape[0]
    args = (x_TD, r.token_A, r.expert_A, r.weight_A, w_gate_EDF, w_up_EDF, w_down_EFD)
    if t and r.token_major and a % t == 0:  # the kernel sums each token's K rows itself
        return cpu_kernels.grouped_swiglu(*args, combine_k=a // t, activation=meta[-1])
    return jax.ops.segment_sum(cpu_kernels.grouped_swiglu(*args, activation=meta[-1]),
                               r.token_A, num_segments=t)


def _cpu_gmm_fwd(meta, *args):
    return _cpu_gmm(meta, *args), args


def _cpu_gmm_bwd(meta, args, g_TD):
    x_TD, weight_A, w_gate_EDF, w_up_EDF, w_down_EFD, token_A, expert_A = args

    def same_function(x, w_A, wg, wu, wd):
        r = _meta_routing(meta, token_A, expert_A, w_A)
        return bucketed_experts(x, r, wg, wu, wd, ACTIVATIONS[meta[-1]])

    _, vjp = jax.vjp(same_function, x_TD, weight_A, w_gate_EDF, w_up_EDF, w_down_EFD)
    return vjp(g_TD) + (None, None)


_cpu_gmm.defvjp(_cpu_gmm_fwd, _cpu_gmm_bwd)


EXPERT_BACKENDS = {
    "dense": dense_experts,
    "bucketed": bucketed_experts,
    "ragged": ragged_experts,
    "cpu_gmm": cpu_gmm_experts,
}


def backend_for(backend: str, dtype, platform: str | None, activation: str = "silu") -> str:
    """``backend`` resolved for the platform (``resolve_backend``) and the experts' gate
    ``activation`` (``ACTIVATIONS``; every backend computes both)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert activation {activation!r}: expected one of "
                         f"{tuple(ACTIVATIONS)}")
    return kernels(platform).moe_backend(backend, dtype if backend == "auto" else None)


def expert_compute(backend: str, x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                   platform: str | None = None, activation: str = "silu"):
    """The routed experts' output ``y_TD`` through ``backend`` for the target ``platform``
    (``auto`` resolved by ``backend_for``; ``pallas`` lowered for the platform), with the
    gate ``activation`` (``ACTIVATIONS``)."""
    table = kernels(platform)
    backend = backend_for(backend, w_gate_EDF.dtype if backend == "auto" else None, platform,
                          activation)
    if backend == "pallas":
        from pallas_kernels.moe_gmm import api as gmm_api

        return gmm_api.moe_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD,
                                   lowering=table.pallas_lowering,
                                   interpret=table.pallas_interpret, activation=activation)
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"moe_backend={backend!r}: expected one of "
                         f"{sorted(EXPERT_BACKENDS) + ['auto', 'pallas']}")
    if backend == "cpu_gmm" and platform not in (None, "cpu"):
        raise ValueError(f"moe_backend='cpu_gmm' runs on CPU only, not on platform "
                         f"{platform!r}; use 'auto'")
    if backend == "cpu_gmm":
        return cpu_gmm_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, activation)
    return EXPERT_BACKENDS[backend](x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD,
                                    ACTIVATIONS[activation])


def data_parallel_experts(config, x_BLD, r: routing_lib.Routing, weights):
    """The experts of a data-parallel mesh (no ``expert`` axis) through a backend XLA cannot
    partition itself: a Pallas kernel is a custom call ("Mosaic kernels cannot be
    automatically partitioned"). One ``shard_map``: each device runs its batch rows'
    assignments against the replicated weights. Token-choice routings (``token_major``)
    split with the batch; expert choice, which ranks tokens over the whole batch, and
    batches that do not split run whole on every device (the same result, computed
    redundantly). Returns ``y_BLD``."""
    from jax.sharding import PartitionSpec as P
    from jmoe.sharding import batch_spec

    b, l, d = x_BLD.shape
    mesh = config.mesh
    spec = batch_spec(mesh, b)
    axis = spec[0] if len(spec) else None
    split = axis is not None and r.token_major
    run = partial(expert_compute, config.moe_backend, platform=config.platform,
                  activation=config.expert_activation)
    if not split:
        def whole(x_BLD, token_A, expert_A, weight_A, *w):
            rr = r.replace(token_A=token_A, expert_A=expert_A, weight_A=weight_A)
            return run(x_BLD.reshape(b * l, d), rr, *w).reshape(b, l, d)

        return jax.shard_map(whole, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(
            x_BLD, r.token_A, r.expert_A, r.weight_A, *weights)

    k = r.token_A.shape[0] // (b * l)
    shards = mesh.shape[axis] if isinstance(axis, str) else math.prod(mesh.shape[a] for a in axis)
    bl = b // shards

    def local(x_BLD, token_BA, expert_BA, weight_BA, *w):
        offset = jax.lax.axis_index(axis) * bl * l
        rr = routing_lib.Routing(token_A=token_BA.reshape(-1) - offset,
                                 expert_A=expert_BA.reshape(-1), weight_A=weight_BA.reshape(-1),
                                 num_experts=r.num_experts, num_tokens=bl * l,
                                 token_major=True, max_load=None)
        return run(x_BLD.reshape(bl * l, d), rr, *w).reshape(bl, l, d)

    rows = P(axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, rows) + (P(),) * 3,
                         out_specs=rows, check_vma=False)(
        x_BLD, r.token_A.reshape(b, l * k), r.expert_A.reshape(b, l * k),
        r.weight_A.reshape(b, l * k), *weights)


def distinct_experts(r: routing_lib.Routing, b: int):
    """Distinct experts with at least one live assignment in each of the ``b`` sequences
    (tokens ``T = b * L`` in order), int32 ``[B]``."""
    e, l = r.num_experts, r.num_tokens // b
    used = jnp.zeros((b, e + 1), bool).at[r.token_A // l, r.expert_A].set(True)
    return used[:, :e].sum(-1).astype(jnp.int32)


def gather_set(r: routing_lib.Routing, allowed_BE, experts_per_block: int, weights):
    """Compact a routing and the expert weights to the union of the block sets.

    ``U = min(E, B * M)`` slots (static) hold the union's expert ids in increasing
    order (then experts no sequence may use, which get no rows); returns the routing
    over ``U`` experts and the weights gathered to ``[U, ...]``, so the backend reads
    only those experts' weights.
    """
    e = r.num_experts
    u = min(e, allowed_BE.shape[0] * experts_per_block)
    ids_U = jnp.argsort(jnp.where(allowed_BE.any(0), 0, 1), stable=True)[:u].astype(jnp.int32)
    pos = jnp.full((e + 1,), u, jnp.int32).at[ids_U].set(jnp.arange(u, dtype=jnp.int32))
    r_u = r.replace(expert_A=pos[r.expert_A], num_experts=u)
    return r_u, tuple(w[ids_U] for w in weights)


def layer_aux(r: routing_lib.Routing, logits_BLE, valid_BL, top_k: int,
              platform: str | None = None) -> dict:
    """One MoE layer's aux: router logits ``[B, L, E]``, chosen ids/weights ``[B, L, K]``,
    expert counts ``[E]``, routed pairs, unrouted tokens, load-balancing stats, distinct
    experts per sequence ``[B]``."""
    b, l, e = logits_BLE.shape
    valid_T = valid_BL.reshape(-1)
    logits_TE = logits_BLE.reshape(b * l, e)
    ids_TK, w_TK = r.per_token()
    aux = {
        "router_logits": logits_BLE,
        "expert_ids": ids_TK.reshape(b, l, -1),
        "expert_weights": w_TK.reshape(b, l, -1),
        "expert_counts": r.expert_counts(),
        "routed_pairs": r.live_A.sum(),
        "unrouted_tokens": r.unrouted_tokens(valid_T),
        "distinct_experts": distinct_experts(r, b),
    }
    aux["lb_f"], aux["lb_p"] = routing_lib.load_balancing_stats(logits_TE, top_k, valid_T,
                                                                platform)
    return aux


class MoE(nn.Module):
    """The MoE of one decoder layer: route -> experts (backend) -> combine, plus the
    always-on shared experts (``config.num_shared_experts``), for every family.

    ``__call__(x_BLD, valid_BL, budget) -> (y_BLD, aux)``. With
    ``budget.experts_per_block`` each sequence's tokens route within its block expert
    set (``routing.block_expert_set``, reported as ``aux["expert_set"]``); the dense,
    bucketed and ragged backends then run on the set's weights only (``gather_set``;
    when ``B * M < E``), cpu_gmm and pallas read only experts with rows anyway (so a
    ``set_coverage`` below 1 reads fewer than M there).
    The router is the family's
    (``config.router``, ``jmoe.routing.ROUTERS``) under ``config.routing``, in float32,
    run once; with ``config.mesh`` holding an ``expert`` axis > 1 the experts run
    expert-parallel (``jmoe.expert_parallel``). aux: ``layer_aux``, plus
    ``ep_dropped`` when expert-parallel.

    Params: ``router [D, E]``, the router's extra params (``expert_bias [E]`` float32
    for the sigmoid router), ``w_gate``/``w_up [E, D, F]``, ``w_down [E, F, D]``, and
    ``shared/{w_gate, w_up, w_down}`` (width ``F * num_shared_experts``).
    """

    config: Any

    @nn.compact
    def __call__(self, x_BLD, valid_BL, budget: routing_lib.Budget, x_route_BLD=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, l, d = x_BLD.shape
        e, f = c.num_experts, c.moe_intermediate_size
        router_DE = self.param("router", logical_init(("embed", None)), (d, e), dt)
        # router params (the selection bias) stay float32: tuned in small steps in training
        router_params = {n: self.param(n, logical_init(
            (None,), nn.initializers.ones if n in routing_lib.ROUTER_PARAMS_ONES
            else nn.initializers.zeros), (e,), jnp.float32)
            for n in routing_lib.ROUTER_PARAMS[c.router]}
        x_route = (x_BLD if x_route_BLD is None else x_route_BLD).astype(jnp.float32)
        if c.router == "gemma_softmax_topk":
            # DiffusionGemma routes the residual stream through a scale-free RMSNorm times a
            # learned [D] scale and D^-0.5 (transformers' DiffusionGemmaTextRouter); float32
            scale_D = self.param("router_scale", logical_init(("norm",), nn.initializers.ones),
                                 (d,), dt)
            x_route = x_route * jax.lax.rsqrt(jnp.mean(x_route * x_route, -1, keepdims=True)
                                              + c.rms_norm_eps)
            x_route = x_route * scale_D.astype(jnp.float32) * d ** -0.5
        weights = (self.param("w_gate", logical_init(("expert", "embed", "mlp")), (e, d, f), dt),
                   self.param("w_up", logical_init(("expert", "embed", "mlp")), (e, d, f), dt),
                   self.param("w_down", logical_init(("expert", "mlp", "embed")), (e, f, d), dt))

        logits_BLE = jnp.einsum("BLD,DE->BLE", x_route, router_DE.astype(jnp.float32))
        allowed_BE = routing_lib.block_expert_set(c, logits_BLE, router_params, valid_BL, budget)
        r = routing_lib.route(c, logits_BLE, router_params, valid_BL, budget, allowed_BE)
        aux = layer_aux(r, logits_BLE, valid_BL, c.num_experts_per_tok, c.platform)
        if allowed_BE is not None:
            aux["expert_set"] = allowed_BE
        if expert_parallel_active(c.mesh):
            y_BLD, aux["ep_dropped"] = expert_parallel.expert_parallel_moe(
                c.mesh, x_BLD, r, weights,
                experts=partial(expert_compute, c.moe_backend, platform=c.platform,
                                activation=c.expert_activation),
                capacity_factor=c.ep_capacity_factor)
        elif c.mesh is not None and kernels(c.platform).moe_backend(c.moe_backend, dt) == "pallas":
            y_BLD = data_parallel_experts(c, x_BLD, r, weights)
        else:
            backend = backend_for(c.moe_backend, weights[0].dtype, c.platform,
                                  c.expert_activation)
            if allowed_BE is not None and backend not in ("cpu_gmm", "pallas") and \
                    b * budget.experts_per_block < e:
                # cpu_gmm and the Pallas kernel never read an expert without rows (the
                # kernel's grid fetches only the touched experts' weight blocks:
                # pallas_kernels/moe_gmm/traffic.py), so a gather would only add a copy
                # of M experts; ragged_dot, bucketed and dense get the union of the sets
                r, weights = gather_set(r, allowed_BE, budget.experts_per_block, weights)
            y_BLD = expert_compute(backend, x_BLD.reshape(b * l, d), r, *weights,
                                   platform=c.platform,
                                   activation=c.expert_activation).reshape(b, l, d)
        y_BLD = y_BLD.astype(x_BLD.dtype)
        if c.num_shared_experts:
            y_BLD = y_BLD + SwiGLU(f * c.num_shared_experts, dt, name="shared")(x_BLD)
        return y_BLD, aux
