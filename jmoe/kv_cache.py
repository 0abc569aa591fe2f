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

A *bidirectional* cache (``KVCache.bidirectional``: the approximate prefix and dual
caches of Fast-dLLM for bidirectional models) also holds each buffer position's
``valid`` flag and rotary position ``pos`` (``[B, S]``; the canvas's left padding is
invalid). A call of ``S`` tokens (the whole canvas) computes exactly what the uncached
call computes and writes every position's keys/values (a *refresh*); a shorter call
(a *window* at ``length``) writes only its valid tokens' keys/values (the others keep
the cached ones, possibly stale) and its queries attend over every valid buffer
position. Under bidirectional attention stored keys/values go stale as soon as any
token changes: the cache is an approximation that a refresh makes exact again.
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
    valid: jax.Array | None = None  # bidirectional caches: [B, S] bool, real keys
    pos: jax.Array | None = None    # bidirectional caches: [B, S] int32 rotary positions
    # DiffusionGemma's encoder cache: [B, S] bool, positions holding a real token's K/V
    # (per-layer buffers then differ in N and K by layer kind; jmoe.models.diffusion_gemma)
    key_valid: jax.Array | None = None

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

    @classmethod
    def bidirectional_empty(cls, config, valid_BS, pos_BS) -> "KVCache":
        """Zero buffers over a canvas ``[B, S]`` for bidirectional attention: an
        approximate cache (Fast-dLLM's prefix and dual caches), exact only right after
        a refresh. ``valid_BS`` marks real positions, ``pos_BS`` their rotary positions."""
        b, s = valid_BS.shape
        shape = (b, s, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in range(config.num_layers))
        return cls(k=zeros, v=zeros, length=jnp.zeros((), jnp.int32), block_length=None,
                   valid=jnp.asarray(valid_BS, bool), pos=jnp.asarray(pos_BS, jnp.int32))

    @property
    def bidirectional(self) -> bool:
        """An approximate cache for bidirectional attention (``bidirectional_empty``)."""
        return self.valid is not None

    @property
    def size(self) -> int:
        """S, the buffer positions."""
        return self.k[0].shape[1]

    def positions(self, batch: int, l: int):
        """Absolute positions ``[B, L]`` of a call's L tokens (bidirectional caches:
        the stored rotary positions of buffer positions ``length .. length + L - 1``)."""
        if self.bidirectional:
            return jax.lax.dynamic_slice_in_dim(self.pos, self.length, l, axis=1)
        return jnp.broadcast_to(self.length + jnp.arange(l, dtype=jnp.int32), (batch, l))

    def mask_bias(self, q_pos_BL):
        """Additive mask ``[B, 1, L, S]`` of a call's queries over the buffer (0 or NEG_INF)."""
        if self.bidirectional:  # every real key: [B, 1, 1, S]
            return jnp.where(self.valid, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]
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

    def write(self, layer: int, k_BLNK, v_BLNK, fresh_BL=None):
        """The layer's buffers with a call's keys/values written at ``length``; with
        ``fresh_BL`` only those positions' (the others keep the buffer's)."""
        def put(buf, new):
            new = new.astype(buf.dtype)
            if fresh_BL is not None:
                old = jax.lax.dynamic_slice_in_dim(buf, self.length, new.shape[1], axis=1)
                new = jnp.where(fresh_BL[:, :, None, None], new, old)
            return jax.lax.dynamic_update_slice_in_dim(buf, new, self.length, axis=1)

        return put(self.k[layer], k_BLNK), put(self.v[layer], v_BLNK)
