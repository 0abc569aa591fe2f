"""Grouped-matmul Pallas kernels over a ``GroupLayout`` (rows sorted and tiled by expert).

Shape letters: M padded rows, K contraction, N output columns, E experts, I row tiles.

Two ops, each with a TPU (Mosaic) and a GPU (Triton) form that share the tile math
(``_tile_products``) and differ only in how a program finds its expert's weights:

  gmm   out_MN[rows of tile i] = epilogue(lhs_p[tile i] @ rhs_p[expert(i)] for each pair p)
        (``trans_rhs``: rhs is [E, N, K] and is used transposed; for the backward pass)
  tgmm  out_EKN[e] = sum over the tiles of group e of lhs[tile]^T @ rhs[tile]
        (the weight gradient of gmm)

Dead tiles (index >= ``num_live_tiles``, i.e. past the live rows) are skipped with
``pl.when``: nothing is computed or stored for them, so their rows are never written
(NaN in interpret mode, garbage on a device) and callers mask them with ``jnp.where``.
On TPU their block indices are clamped to the last live tile, so the pipeline neither
fetches new inputs nor writes back a fresh output block for them. In tgmm an expert
with no rows is never visited; callers mask its (unwritten) gradient the same way.

``interpret=True`` runs either form on CPU through the Pallas HLO interpreter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.moe_gmm.layout import GroupLayout

LOWERINGS = ("tpu", "gpu")
# Triton params select the Pallas-Triton GPU backend (otherwise jax may pick Mosaic GPU,
# which stages whole blocks in shared memory: the in-kernel weight indexing needs Triton).
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes. ``tm`` rows per tile (each expert's group is padded to a multiple of
    it); ``tn`` output columns per program; ``tk`` contraction chunk per inner step
    (``None``: the whole contraction in one step, best on TPU where a block is in VMEM).
    ``tn``/``tk`` are shrunk to the largest power-of-two divisor of a dimension that
    they do not divide (``gcd``), so any model size runs.
    """

    tm: int = 128
    tn: int = 128
    tk: int | None = None

    def __post_init__(self):
        for name in ("tm", "tn", "tk"):
            v = getattr(self, name)
            if v is None and name == "tk":
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes.{name}={v!r}: expected a positive int")

    @staticmethod
    def for_lowering(lowering: str, interpret: bool) -> "BlockSizes":
        if interpret:  # CPU tests and fallbacks: small tiles, few wasted padding rows
            return BlockSizes(tm=8, tn=128, tk=None)
        if lowering == "gpu":  # Triton: register-resident tiles, K in 32-wide steps
            return BlockSizes(tm=64, tn=64, tk=32)
        # wide column tiles, capped by VMEM in gmm (tpu_column_tile): each column tile
        # re-reads the row tile, and at decode sizes the rows are the excess traffic
        return BlockSizes(tm=128, tn=512, tk=None)


# VMEM the TPU kernel's double-buffered weight blocks may take (v5e's default scoped
# VMEM is 16 MiB; rows, outputs and accumulators need the rest)
TPU_WEIGHT_VMEM = 8 * 2**20


def tpu_column_tile(k: int, n_rhs: int, itemsize: int) -> int:
    """The widest power-of-two column tile (128 at least) whose ``n_rhs`` double-buffered
    ``[k, tn]`` weight blocks fit ``TPU_WEIGHT_VMEM``. Wide tiles matter on TPU: the grid
    re-reads a row tile once per column tile (``traffic.gmm_bytes``)."""
    tn = 128
    while 2 * n_rhs * k * (2 * tn) * itemsize <= TPU_WEIGHT_VMEM:
        tn *= 2
    return tn


def _fit(block: int | None, dim: int) -> int:
    if block is None or block >= dim:
        return dim
    return block if dim % block == 0 else math.gcd(block, dim)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """f32-accumulating tile product; f32 inputs at full precision (no TF32/bf16 passes)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _tile_products(load_lhs, load_rhs, *, n_pairs, n_lhs, k, tk, trans_rhs, shape):
    """``[lhs_p @ rhs_p for p]`` over one tile, accumulated over K in ``tk`` chunks.

    ``load_lhs(p, ks)`` / ``load_rhs(p, ks)`` read chunk ``ks`` of pair p; the two
    lowerings differ only in these loaders.
    """
    def step(s, accs):
        ks = slice(None) if s is None else pl.ds(pl.multiple_of(s * tk, tk), tk)
        return tuple(acc + _dot(load_lhs(min(p, n_lhs - 1), ks), load_rhs(p, ks),
                                trans_b=trans_rhs) for p, acc in enumerate(accs))

    init = tuple(jnp.zeros(shape, jnp.float32) for _ in range(n_pairs))
    if tk == k:  # whole contraction at once (the TPU default: blocks already in VMEM)
        return step(None, init)
    return jax.lax.fori_loop(0, k // tk, step, init)


def _store(out_refs, outs):
    for o_ref, o in zip(out_refs, outs):
        o_ref[...] = o.astype(o_ref.dtype)


def gmm(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], layout: GroupLayout, *,
        epilogue: Callable, n_out: int, out_dtype, trans_rhs: bool = False,
        blocks: BlockSizes, lowering: str = "tpu", interpret: bool = False):
    """Grouped matmul over the layout's row tiles; returns ``n_out`` arrays ``[M, N]``.

    ``lhs``: one ``[M, K]`` array shared by every pair, or one per pair; ``rhs``: the
    pairs' weights ``[E, K, N]`` (``[E, N, K]`` with ``trans_rhs``). ``epilogue`` maps the
    pairs' f32 tile products to ``n_out`` tiles (e.g. ``silu(a) * b``). Rows of dead
    tiles are left unwritten.

    Example:
      (h,) = gmm([xs_MD], [w_gate, w_up], layout, epilogue=lambda a, b: (silu(a) * b,),
                 n_out=1, out_dtype=xs_MD.dtype, blocks=BlockSizes(tm=8))
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering={lowering!r}: expected one of {LOWERINGS}")
    if len(lhs) not in (1, len(rhs)):
        raise ValueError(f"gmm got {len(lhs)} lhs for {len(rhs)} rhs: expected 1 or {len(rhs)}")
    m, k = lhs[0].shape
    n = rhs[0].shape[1] if trans_rhs else rhs[0].shape[2]
    if m != layout.num_rows or blocks.tm != layout.tm:
        raise ValueError(f"gmm lhs has {m} rows / tm={blocks.tm}; the layout has "
                         f"{layout.num_rows} rows / tm={layout.tm}")
    tn = blocks.tn
    if lowering == "tpu" and not interpret:
        tn = min(tn, tpu_column_tile(k, len(rhs), rhs[0].dtype.itemsize))
    cfg = dict(n_pairs=len(rhs), n_lhs=len(lhs), k=k, tk=_fit(blocks.tk, k),
               trans_rhs=trans_rhs, shape=(layout.tm, _fit(tn, n)))
    build = _gmm_tpu if lowering == "tpu" else _gmm_gpu
    out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)] * n_out
    return build(lhs, rhs, layout, epilogue, cfg, out_shape, interpret)


def _gmm_tpu(lhs, rhs, layout, epilogue, cfg, out_shape, interpret):
    tm, tn = cfg["shape"]
    k, trans, n_in = cfg["k"], cfg["trans_rhs"], len(lhs) + len(rhs)
    n = out_shape[0].shape[1]

    def row_tile(j, i, te, nl):  # dead tiles reuse the last live block: no DMA, no writeback
        return (jnp.minimum(i, jnp.maximum(nl[0] - 1, 0)), 0)

    def out_tile(j, i, te, nl):
        return (row_tile(j, i, te, nl)[0], j)

    if trans:
        rhs_spec = pl.BlockSpec((pl.Squeezed(), tn, k), lambda j, i, te, nl: (te[i], j, 0))
    else:
        rhs_spec = pl.BlockSpec((pl.Squeezed(), k, tn), lambda j, i, te, nl: (te[i], 0, j))

    def kernel(te_ref, nl_ref, *refs):
        lhs_refs, rhs_refs, out_refs = refs[:len(lhs)], refs[len(lhs):n_in], refs[n_in:]

        @pl.when(pl.program_id(1) < nl_ref[0])
        def _():
            def load_rhs(p, ks):
                return rhs_refs[p][:, ks] if trans else rhs_refs[p][ks, :]

            accs = _tile_products(lambda p, ks: lhs_refs[p][:, ks], load_rhs, **cfg)
            _store(out_refs, epilogue(*accs))

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(n // tn, layout.num_tiles),
        in_specs=[pl.BlockSpec((tm, k), row_tile)] * len(lhs) + [rhs_spec] * len(rhs),
        out_specs=[pl.BlockSpec((tm, tn), out_tile)] * len(out_shape))
    # row tiles run in order (dead tiles revisit the last live block): "arbitrary"
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec, compiler_params=params,
                          interpret=interpret, name="moe_gmm")(
        layout.tile_expert_I, layout.num_live_tiles, *lhs, *rhs)


def _gmm_gpu(lhs, rhs, layout, epilogue, cfg, out_shape, interpret):
    tm, tn = cfg["shape"]
    k, trans, n_in = cfg["k"], cfg["trans_rhs"], len(lhs) + len(rhs)
    n = out_shape[0].shape[1]

    def kernel(te_ref, nl_ref, *refs):  # metadata arrive as ordinary (whole) inputs
        lhs_refs, rhs_refs, out_refs = refs[:len(lhs)], refs[len(lhs):n_in], refs[n_in:]
        j, i = pl.program_id(0), pl.program_id(1)

        @pl.when(i < nl_ref[0])
        def _():
            e, cols = te_ref[i], pl.ds(j * tn, tn)  # Triton: weights indexed in-kernel

            def load_rhs(p, ks):
                return rhs_refs[p][e, cols, ks] if trans else rhs_refs[p][e, ks, cols]

            accs = _tile_products(lambda p, ks: lhs_refs[p][:, ks], load_rhs, **cfg)
            _store(out_refs, epilogue(*accs))

    whole = lambda x: pl.BlockSpec(x.shape, lambda j, i: (0,) * x.ndim)  # noqa: E731
    in_specs = ([whole(layout.tile_expert_I), whole(layout.num_live_tiles)]
                + [pl.BlockSpec((tm, k), lambda j, i: (i, 0))] * len(lhs)
                + [whole(w) for w in rhs])
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n // tn, layout.num_tiles), in_specs=in_specs,
        out_specs=[pl.BlockSpec((tm, tn), lambda j, i: (i, j))] * len(out_shape),
        compiler_params=_TRITON, interpret=interpret, name="moe_gmm")(
        layout.tile_expert_I, layout.num_live_tiles, *lhs, *rhs)


def tgmm(lhs_MK, rhs_MN, layout: GroupLayout, *, blocks: BlockSizes, lowering: str = "tpu",
         interpret: bool = False):
    """Per-expert ``lhs^T @ rhs`` over each group's rows: ``[E, K, N]`` float32.

    Experts with no rows are never written: mask them with ``layout.tiles_E > 0``.

    Example:
      dw_gate_EDF = tgmm(xs_MD, da_MF, layout, blocks=BlockSizes(tm=8))
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering={lowering!r}: expected one of {LOWERINGS}")
    (m, k), n = lhs_MK.shape, rhs_MN.shape[1]
    if m != layout.num_rows or rhs_MN.shape[0] != m:
        raise ValueError(f"tgmm got {m} / {rhs_MN.shape[0]} rows; layout has {layout.num_rows}")
    # both output dims are free (the contraction is over a tile's tm rows): tn x tn tiles
    tk, tn = _fit(blocks.tn, k), _fit(blocks.tn, n)
    out_shape = jax.ShapeDtypeStruct((layout.num_experts, k, n), jnp.float32)
    build = _tgmm_tpu if lowering == "tpu" else _tgmm_gpu
    return build(lhs_MK, rhs_MN, layout, tk, tn, out_shape, interpret)


def _tgmm_tpu(lhs_MK, rhs_MN, layout, tk, tn, out_shape, interpret):
    """Grid (K/tk, N/tn, I): consecutive tiles of one group accumulate into one block."""
    tm = layout.tm
    _, k, n = out_shape.shape

    def row_tile(c, i, nl):
        return jnp.minimum(i, jnp.maximum(nl[0] - 1, 0))

    def kernel(te_ref, nl_ref, lhs_ref, rhs_ref, out_ref):
        i = pl.program_id(2)
        live = i < nl_ref[0]
        first = (i == 0) | (te_ref[i] != te_ref[jnp.maximum(i - 1, 0)])

        @pl.when(live & first)
        def _():
            out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

        @pl.when(live)
        def _():
            # explicit transpose, then a plain NN matmul (as Mosaic prefers)
            out_ref[...] += _dot(lhs_ref[...].swapaxes(0, 1), rhs_ref[...])

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(k // tk, n // tn, layout.num_tiles),
        in_specs=[pl.BlockSpec((tm, tk), lambda a, b, i, te, nl: (row_tile(a, i, nl), a)),
                  pl.BlockSpec((tm, tn), lambda a, b, i, te, nl: (row_tile(b, i, nl), b))],
        out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda a, b, i, te, nl: (te[i], a, b)))
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec, compiler_params=params,
                          interpret=interpret, name="moe_tgmm")(
        layout.tile_expert_I, layout.num_live_tiles, lhs_MK, rhs_MN)


def _tgmm_gpu(lhs_MK, rhs_MN, layout, tk, tn, out_shape, interpret):
    """Grid (E, K/tk, N/tn): each program loops over its own group's tiles."""
    tm = layout.tm
    e, k, n = out_shape.shape

    def kernel(start_ref, tiles_ref, lhs_ref, rhs_ref, out_ref):
        g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start = start_ref[g]

        def step(t, acc):
            rows = pl.ds(pl.multiple_of(t * tm, tm), tm)
            return acc + _dot(lhs_ref[rows, pl.ds(a * tk, tk)], rhs_ref[rows, pl.ds(b * tn, tn)],
                              trans_a=True)

        acc = jax.lax.fori_loop(start, start + tiles_ref[g], step,
                                jnp.zeros((tk, tn), jnp.float32))
        out_ref[...] = acc  # an empty expert gets zeros here (the TPU form leaves it unwritten)

    whole = lambda x: pl.BlockSpec(x.shape, lambda g, a, b: (0,) * x.ndim)  # noqa: E731
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(e, k // tk, n // tn),
        in_specs=[whole(layout.tile_start_E), whole(layout.tiles_E), whole(lhs_MK), whole(rhs_MN)],
        out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda g, a, b: (g, a, b)),
        compiler_params=_TRITON, interpret=interpret, name="moe_tgmm")(
        layout.tile_start_E, layout.tiles_E, lhs_MK, rhs_MN)
