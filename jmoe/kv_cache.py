"""``KVCache``: the keys and values a model call reads instead of recomputing them.

Shape letters: B batch, S buffer positions, N kv heads, K head dim, L the call's
tokens. Terms: a *block* is ``block_length`` positions aligned to absolute position
0; under block-causal attention a block's keys/values never depend on later
blocks, so once its tokens are final they can be stored and reused exactly.

A cache holds one ``[B, S, N, K]`` key and value buffer per layer over absolute
positions ``0..S-1``, and ``length``: positions ``< length`` hold final keys/values.
A cached call (``jmoe.model.apply(..., cache=c)``) places its ``L`` tokens at
positions ``length .. length + L - 1`` in every row (no padding inside a row's
prefix), writes their keys/values there, and attends to buffer positions
``< length + L`` under the cache's mask (block-causal with ``block_length``, or
causal when ``block_length`` is None). The returned cache has ``length + L``:
keep it to *commit* the call's tokens (a finished block), drop it to re-run the
same positions (another denoising step of the same block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jmoe.layers import NEG_INF


@struct.dataclass
class KVCache:
    k: tuple  # per layer: [B, S, N, K] keys, model dtype
    v: tuple  # per layer: [B, S, N, K] values
    length: jax.Array  # int32 []: positions < length hold final keys/values
    block_length: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def empty(cls, config, batch: int, length: int) -> "KVCache":
        """Zero buffers of ``length`` positions for ``config``'s attention geometry.

        Needs a mask under which stored keys/values stay exact: block-causal
        (``attention_block_length`` set) or causal. Bidirectional attention lets every
        key depend on every later token, so it is a ValueError.
        """
        if config.mask_kind == "bidirectional":
            raise ValueError("a K/V cache needs block-causal or causal attention: set "
                             "attention_block_length (got None with causal=False)")
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in range(config.num_layers))
        return cls(k=zeros, v=zeros, length=jnp.zeros((), jnp.int32),
                   block_length=config.attention_block_length)

    @property
    def size(self) -> int:
        """S, the buffer positions."""
        return self.k[0].shape[1]

    def positions(self, batch: int, l: int):
        """Absolute positions ``[B, L]`` of a call's L tokens."""
        return jnp.broadcast_to(self.length + jnp.arange(l, dtype=jnp.int32), (batch, l))

    def mask_bias(self, q_pos_BL):
        """Additive mask ``[B, 1, L, S]`` of a call's queries over the buffer (0 or NEG_INF)."""
        b, l = q_pos_BL.shape
        k_pos_S = jnp.arange(self.size, dtype=jnp.int32)
        # slots past this call's tokens hold nothing yet, or stale values: never visible
        written_S = k_pos_S < self.length + l
        if self.block_length:
            allowed = (k_pos_S[None, None, :] // self.block_length
                       <= q_pos_BL[:, :, None] // self.block_length)
        else:
            allowed = k_pos_S[None, None, :] <= q_pos_BL[:, :, None]
        allowed = allowed & written_S[None, None, :]
        return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]

    def write(self, layer: int, k_BLNK, v_BLNK):
        """The layer's buffers with a call's keys/values written at ``length``."""
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), self.length, axis=1)
        return put(self.k[layer], k_BLNK), put(self.v[layer], v_BLNK)
