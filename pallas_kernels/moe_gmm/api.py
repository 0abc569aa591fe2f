"""MoE experts on grouped matmuls: sort -> gate/up (SiLU fused) -> down -> unsort -> combine.

Shape letters: T tokens, D model dim, F expert ffn dim, E experts, A assignments,
M padded sorted rows (see ``layout.py``).

``moe_experts`` is the ``moe_backend="pallas"`` expert compute. It picks the kernel
lowering by platform: TPU -> Mosaic (scalar-prefetched group metadata), GPU -> Triton,
anything else -> the same kernel in Pallas interpret mode (slow: meant for tests on
CPU; it says so once in the log). ``backend="xla"`` swaps the kernels for the jnp
reference (ragged_dot) with the same layout and the same custom VJP.

Gradients: a ``jax.custom_vjp`` whose backward pass is grouped matmuls too: the
transposed-weight gmm for the input gradients and tgmm (per-group ``lhs^T @ rhs``)
for the weight gradients; gate/up activations are recomputed, not stored.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.moe_gmm import kernel as kernel_lib
from pallas_kernels.moe_gmm import reference as reference_lib
from pallas_kernels.moe_gmm.kernel import BlockSizes
from pallas_kernels.moe_gmm.layout import GroupLayout, make_layout

log = logging.getLogger("jmoe")
BACKENDS = ("pallas", "xla")
_warned: set[str] = set()


def pick_lowering(platform: str | None) -> tuple[str, bool]:
    """``(lowering, interpret)`` for the target platform (None: unknown, interpret)."""
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    if platform not in _warned:
        _warned.add(platform)
        log.warning("moe_gmm: no TPU or GPU (platform=%r); running the Pallas MoE kernel in "
                    "interpret mode, which is slow. moe_backend='bucketed' is the fast CPU path.",
                    platform)
    return "tpu", True


@dataclasses.dataclass(frozen=True)
class _Impl:
    """Which grouped matmuls run: the Pallas kernels (one lowering) or the jnp reference."""

    backend: str
    lowering: str
    interpret: bool
    blocks: BlockSizes

    def gmm(self, lhs, rhs, layout, *, epilogue, n_out, out_dtype, trans_rhs=False):
        kw = dict(epilogue=epilogue, n_out=n_out, out_dtype=out_dtype, trans_rhs=trans_rhs)
        if self.backend == "xla":
            return reference_lib.gmm_reference(lhs, rhs, layout, **kw)
        return kernel_lib.gmm(lhs, rhs, layout, blocks=self.blocks, lowering=self.lowering,
                              interpret=self.interpret, **kw)

    def tgmm(self, lhs_MK, rhs_MN, layout):
        if self.backend == "xla":
            return reference_lib.tgmm_reference(lhs_MK, rhs_MN, layout)
        return kernel_lib.tgmm(lhs_MK, rhs_MN, layout, blocks=self.blocks,
                               lowering=self.lowering, interpret=self.interpret)


# the gate activation of the experts (SwiGLU: silu; GeGLU with tanh GELU: gelu_tanh)
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def _gated(activation: str):
    act = _ACTIVATIONS[activation]
    return lambda a, b: (act(a) * b,)


def _identity(*accs):
    return accs


def _sum(p, q):
    return (p + q,)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def swiglu_rows(impl: _Impl, activation: str, xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD,
                layout: GroupLayout):
    """Gated (``activation``: ``silu`` SwiGLU, ``gelu_tanh`` GeGLU) expert of each sorted
    row, ``[M, D]``; rows of dead tiles are exact zeros."""
    return _forward(impl, activation, xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)[0]


def _forward(impl, activation, xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
    (h_MF,) = impl.gmm([xs_MD], [w_gate_EDF, w_up_EDF], layout, epilogue=_gated(activation),
                       n_out=1, out_dtype=xs_MD.dtype)
    (y_MD,) = impl.gmm([h_MF], [w_down_EFD], layout, epilogue=_identity, n_out=1,
                       out_dtype=xs_MD.dtype)
    # Dead-tile rows were never written: select, not multiply (NaN * 0 is NaN).
    y_MD = jnp.where(layout.live_rows_M()[:, None], y_MD, 0)
    return y_MD, (xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)


def _backward(impl, activation, res, dy_MD):
    xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD, layout = res
    live = layout.live_rows_M()[:, None]
    f32, dt = jnp.float32, xs_MD.dtype
    # recompute the gate/up pre-activations (cheaper in memory than storing two [M, F])
    a_MF, b_MF = impl.gmm([xs_MD], [w_gate_EDF, w_up_EDF], layout, epilogue=_identity,
                          n_out=2, out_dtype=f32)
    (dh_MF,) = impl.gmm([dy_MD], [w_down_EFD], layout, epilogue=_identity, n_out=1,
                        out_dtype=f32, trans_rhs=True)
    # act(a) and its derivative elementwise (jax.jvp with a ones tangent)
    silu_a, dact_MF = jax.jvp(_ACTIVATIONS[activation], (a_MF,), (jnp.ones_like(a_MF),))
    h_MF = jnp.where(live, silu_a * b_MF, 0).astype(dt)
    da_MF = jnp.where(live, dh_MF * b_MF * dact_MF, 0).astype(dt)
    db_MF = jnp.where(live, dh_MF * silu_a, 0).astype(dt)
    (dxs_MD,) = impl.gmm([da_MF, db_MF], [w_gate_EDF, w_up_EDF], layout, epilogue=_sum,
                         n_out=1, out_dtype=dt, trans_rhs=True)
    dxs_MD = jnp.where(live, dxs_MD, 0)
    has_rows = (layout.tiles_E > 0)[:, None, None]  # empty experts' blocks are never written

    def weight_grad(lhs, rhs, w):
        return jnp.where(has_rows, impl.tgmm(lhs, rhs, layout), 0).astype(w.dtype)

    return (dxs_MD, weight_grad(xs_MD, da_MF, w_gate_EDF), weight_grad(xs_MD, db_MF, w_up_EDF),
            weight_grad(h_MF, dy_MD.astype(dt), w_down_EFD), None)


swiglu_rows.defvjp(_forward, _backward)


def moe_experts(x_TD, r, w_gate_EDF, w_up_EDF, w_down_EFD, *, backend: str = "pallas",
                lowering: str | None = None, interpret: bool | None = None,
                blocks: BlockSizes | None = None, activation: str = "silu"):
    """Routed SwiGLU experts for a routing; returns ``y_TD``.

    ``r`` is any object with ``token_A``, ``expert_A`` (== ``num_experts`` when
    dropped), ``weight_A``, ``num_experts``, ``num_tokens`` and ``token_major`` (such as
    ``jmoe.routing.Routing``): this package imports nothing from jmoe.

    Dropped assignments (expert id E) are sorted past the live rows and never
    computed; the weighted outputs are summed into their tokens. Differentiable in
    x, the three weights and the routing weights.

    Example:
      y_TD = moe_experts(x_TD, routing, w_gate_EDF, w_up_EDF, w_down_EFD)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    t, d = x_TD.shape
    e, d_w, _ = w_gate_EDF.shape
    if d_w != d or e != r.num_experts:
        raise ValueError(f"w_gate_EDF shape {w_gate_EDF.shape} does not match x_TD {x_TD.shape} "
                         f"and num_experts={r.num_experts}")
    auto_lowering, auto_interpret = pick_lowering(None) if lowering is None else (lowering, False)
    interpret = auto_interpret if interpret is None else interpret
    blocks = blocks or BlockSizes.for_lowering(auto_lowering, interpret)
    impl = _Impl(backend, auto_lowering, interpret, blocks)

    layout = make_layout(r.token_A, r.expert_A, num_experts=e, num_tokens=t, tm=blocks.tm)
    zero_row = jnp.zeros((1, d), x_TD.dtype)
    xs_MD = jnp.concatenate([x_TD, zero_row])[layout.row_token_M]  # padding rows read zeros
    ys_MD = swiglu_rows(impl, activation, xs_MD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)
    y_AD = jnp.concatenate([ys_MD, zero_row])[layout.row_A]  # dropped -> the zero row
    return _combine(y_AD, r)


def _combine(y_AD, r):
    """Each token's weighted sum of its assignment outputs ``[T, D]`` (token-major
    routings, A = T*K with each token's K adjacent, sum in place)."""
    y_AD = y_AD * r.weight_A[:, None].astype(y_AD.dtype)
    t, a = r.num_tokens, y_AD.shape[0]
    if t and a % t == 0 and r.token_major:
        return y_AD.reshape(t, a // t, -1).sum(1)
    return jax.ops.segment_sum(y_AD, r.token_A, num_segments=t)
