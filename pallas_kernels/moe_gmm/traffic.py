"""HBM bytes a grouped-matmul kernel call moves, from its grid and a group layout.

A Pallas kernel is a custom call: XLA's cost model counts nothing for it. This counts
what the kernel's grid (``kernel.gmm``) moves for given per-expert row counts:

- **TPU** (Mosaic, ``grid = (N / tn, I)``, column tiles outer, row tiles inner): the
  pipeline fetches a block only when its block index differs from the previous grid
  step's. Row tile ``i`` reads ``lhs`` rows ``[tm, K]`` (dead tiles re-use the last
  live block), expert ``tile_expert[i]``'s weight block ``[K, tn]`` and writes ``[tm,
  tn]``. So each touched expert's weights are read once per call, and ``lhs`` once per
  column tile.
- **GPU** (Triton, same grid): each live program loads its ``[tm, K]`` rows and the
  ``[K, tn]`` weight columns of its tile's expert, and writes ``[tm, tn]``; dead tiles
  load nothing. Weights are read once per live tile (no L2 reuse is modelled).

Example:
    b = gmm_bytes([3, 0, 70], lowering="tpu", tm=128, tn=128, k=2048, n=512,
                  n_rhs=2, n_out=1, itemsize=2)
"""

from __future__ import annotations

import numpy as np


def tiles_of(counts_E, tm: int) -> np.ndarray:
    """The expert of each live row tile, experts in order (``layout.make_layout``)."""
    counts = np.asarray(counts_E, np.int64)
    return np.repeat(np.arange(counts.size), -(-counts // tm))


def gmm_bytes(counts_E, *, lowering: str, tm: int, tn: int, k: int, n: int, n_rhs: int,
              n_out: int, itemsize: float, n_lhs: int = 1, lhs_on_chip: bool = False,
              rhs_on_chip: bool = False) -> float:
    """Bytes one ``gmm`` call moves between HBM and the core for row counts ``counts_E``.

    Args:
        counts_E: rows (assignments) per local expert.
        lowering: ``"tpu"`` or ``"gpu"``.
        tm, tn: the row and column tile (``BlockSizes`` after fitting to the shapes).
        k, n: contraction and output width.
        n_rhs, n_out, n_lhs: weight operands (2 for SwiGLU's gate and up), outputs, inputs.
        itemsize: bytes per element.
        lhs_on_chip, rhs_on_chip: operands XLA already placed in on-chip memory count 0.

    Raises:
        ValueError: an unknown lowering.
    """
    te = tiles_of(counts_E, tm)
    live, cols = te.size, -(-n // tn)
    if live == 0:
        return 0.0
    if lowering == "tpu":
        runs = 1 + int(np.count_nonzero(np.diff(te)))  # weight block changes per column tile
        lhs = (cols * live if live > 1 else 1) * tm * k
        rhs = cols * runs * k * tn
    elif lowering == "gpu":
        lhs = cols * live * tm * k
        rhs = cols * live * k * tn
    else:
        raise ValueError(f"lowering={lowering!r}: expected 'tpu' or 'gpu'")
    out = live * tm * cols * tn
    return float(itemsize * ((0 if lhs_on_chip else n_lhs * lhs)
                             + (0 if rhs_on_chip else n_rhs * rhs) + n_out * out))
