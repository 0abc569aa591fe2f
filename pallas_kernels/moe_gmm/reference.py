"""Plain-jnp reference of the grouped matmuls in ``kernel.py`` (same layout, same contract).

The layout's groups are contiguous row ranges starting at row 0 (``tiles_E * tm`` rows
each, in expert order), which is exactly ``jax.lax.ragged_dot``'s group layout, so the
references are ragged_dot and its weight-transpose. Native on TPU; on CPU and GPU XLA
expands it densely (slow), which is why this is the fallback, not the default.
Unlike the kernels, rows of dead tiles come back as zeros.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.moe_gmm.layout import GroupLayout


def _group_sizes(layout: GroupLayout):
    return layout.tiles_E * layout.tm


def gmm_reference(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], layout: GroupLayout, *,
                  epilogue: Callable, n_out: int, out_dtype, trans_rhs: bool = False):
    """``kernel.gmm`` in jnp: ``epilogue(lhs_p @ rhs_p[expert(row)] for each pair p)``."""
    sizes = _group_sizes(layout)
    prods = []
    for p, w in enumerate(rhs):
        w_EKN = jnp.swapaxes(w, 1, 2) if trans_rhs else w
        x = lhs[min(p, len(lhs) - 1)]
        prods.append(jax.lax.ragged_dot(x, w_EKN, sizes, preferred_element_type=jnp.float32,
                                        precision=jax.lax.Precision.HIGHEST))
    outs = epilogue(*prods)
    if len(outs) != n_out:
        raise ValueError(f"epilogue returned {len(outs)} arrays, expected n_out={n_out}")
    return tuple(o.astype(out_dtype) for o in outs)


def tgmm_reference(lhs_MK, rhs_MN, layout: GroupLayout):
    """``kernel.tgmm`` in jnp: per-expert ``lhs^T @ rhs`` over its rows, ``[E, K, N]`` f32.

    The transpose of ragged_dot in its weights, taken with ``jax.linear_transpose``.
    """
    sizes = _group_sizes(layout)
    lhs = lhs_MK.astype(jnp.float32)
    w0 = jax.ShapeDtypeStruct((layout.num_experts, lhs.shape[1], rhs_MN.shape[1]), jnp.float32)

    def apply(w):
        return jax.lax.ragged_dot(lhs, w, sizes, precision=jax.lax.Precision.HIGHEST)

    (dw,) = jax.linear_transpose(apply, w0)(rhs_MN.astype(jnp.float32))
    return dw
