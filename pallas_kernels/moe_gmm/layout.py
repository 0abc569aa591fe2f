"""Group layout: assignments sorted by expert into row tiles, with the kernel's metadata.

Shape letters: T tokens, A assignments, E experts, M padded rows, I row tiles
(M = I * tm).

Each expert's assignments occupy whole row tiles (its group is padded up to a
multiple of ``tm``), so a tile belongs to exactly one expert and the kernel picks
that expert's weights from ``tile_expert_I``. Tiles are laid out expert by expert;
the ``num_live_tiles`` tiles that hold live rows come first and the rest are dead:
dropped assignments (expert id ``E``) get no row at all. I is a static bound,
``sum_e ceil(c_e / tm) <= (A + min(E, A) * (tm - 1)) / tm``, so shapes never depend
on the budgets while the work (live tiles) does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class GroupLayout:
    tile_expert_I: jax.Array   # int32 [I]: expert of each tile; dead tiles repeat the last live one
    num_live_tiles: jax.Array  # int32 [1]: tiles 0..n-1 hold live rows, tiles n.. are skipped
    tile_start_E: jax.Array    # int32 [E]: first tile of each expert's group
    tiles_E: jax.Array         # int32 [E]: tiles of each expert (0 for an empty expert)
    row_token_M: jax.Array     # int32 [M]: token each padded row reads; T for a padding row
    row_A: jax.Array           # int32 [A]: padded row of each assignment; M when dropped
    tm: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)

    @property
    def num_tiles(self) -> int:
        return self.tile_expert_I.shape[0]

    @property
    def num_rows(self) -> int:
        return self.row_token_M.shape[0]

    def live_rows_M(self):
        """``[M]`` bool: rows of live tiles (the only rows the kernels ever write)."""
        return jnp.arange(self.num_rows, dtype=jnp.int32) // self.tm < self.num_live_tiles[0]


def max_tiles(num_assignments: int, num_experts: int, tm: int) -> int:
    """Static bound on the number of row tiles (each non-empty group wastes < tm rows)."""
    groups = min(num_experts, num_assignments)
    return max(1, -(-(num_assignments + groups * (tm - 1)) // tm))


def make_layout(token_A, expert_A, *, num_experts: int, num_tokens: int, tm: int) -> GroupLayout:
    """Sort assignments by expert into ``tm``-row tiles; dropped ones (id E) get no row.

    Example:
      layout = make_layout(r.token_A, r.expert_A, num_experts=8, num_tokens=t, tm=8)
    """
    e = num_experts
    a = expert_A.shape[0]
    n_tiles = max_tiles(a, e, tm)
    m = n_tiles * tm
    expert_A = expert_A.astype(jnp.int32)
    counts_E = jnp.bincount(expert_A, length=e).astype(jnp.int32)  # ignores the sentinel E
    tiles_E = (counts_E + tm - 1) // tm
    tile_end_E = jnp.cumsum(tiles_E, dtype=jnp.int32)
    tile_start_E = tile_end_E - tiles_E
    num_live = tile_end_E[-1]

    # rank of each assignment inside its expert group (stable: original order kept)
    order = jnp.argsort(expert_A, stable=True)
    sorted_e = expert_A[order]
    row_start_E = jnp.cumsum(counts_E) - counts_E
    safe_e = jnp.minimum(sorted_e, e - 1)
    rank = jnp.arange(a, dtype=jnp.int32) - row_start_E[safe_e]
    row_sorted = jnp.where(sorted_e < e, tile_start_E[safe_e] * tm + rank, m)
    row_A = jnp.zeros((a,), jnp.int32).at[order].set(row_sorted)
    row_token_M = jnp.full((m,), num_tokens, jnp.int32).at[row_A].set(
        token_A.astype(jnp.int32), mode="drop")

    # expert of tile i: the group whose tile range holds i. Dead tiles (i >= num_live)
    # repeat the last live tile's expert so their weight blocks are never re-fetched.
    tile_I = jnp.minimum(jnp.arange(n_tiles, dtype=jnp.int32), num_live - 1)
    tile_expert_I = jnp.searchsorted(tile_end_E, tile_I, side="right").astype(jnp.int32)
    tile_expert_I = jnp.clip(tile_expert_I, 0, e - 1)
    return GroupLayout(tile_expert_I=tile_expert_I, num_live_tiles=num_live.reshape(1),
                       tile_start_E=tile_start_E, tiles_E=tiles_E, row_token_M=row_token_M,
                       row_A=row_A, tm=tm, num_experts=e)
