"""Shared Transformer layers: RMSNorm, rotary embedding, attention, SwiGLU MLP.

Shape letters: B batch, L sequence (queries), S sequence (keys), D model dim,
F ffn dim, H query heads, N kv heads, G = H // N query heads per kv head,
K head dim (``head_dim``), R rotary dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import cpu_kernels
from jmoe.platform import kernels

# A finite "minus infinity": a query row with no visible key (a left pad under a
# causal mask) then softmaxes to a uniform row instead of NaN.
NEG_INF = -1e30

default_init = nn.initializers.normal(stddev=0.02)


def logical_init(axes: tuple, init=default_init):
    """``init`` with the param's logical axis names declared where it is created.

    Names: ``vocab``, ``embed`` (D), ``q_heads``/``kv_heads`` (H*K, N*K), ``mlp`` (F),
    ``expert`` (E), ``norm``. ``jmoe.sharding`` maps them onto mesh axes (only
    ``expert`` is split by default; the rest is replicated).
    """
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as in the reference models."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical_init(("norm",), nn.initializers.ones),
                           (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


def rope_tables(positions_BL, rotary_dim: int, theta: float):
    """cos/sin tables ``[B, L, R]`` in float32 (NeoX layout: halves repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BLHK, cos_BLR, sin_BLR, platform: str | None = None):
    """NeoX-style rotary on the first R dims of each head; the rest pass through.

    For a CPU target with jmoe's kernels (``jmoe.platform``) and float32 inputs, the
    ``jmoe_rotary`` kernel (XLA fuses the tables' cos and sin into every layer's q and
    k rotary and evaluates them per head: ~0.6 ms a layer at 4x256 tokens); the
    gradient is ``xla_rope``'s.
    """
    arrays = (x_BLHK, cos_BLR, sin_BLR)
    if all(a.dtype == jnp.float32 for a in arrays) and kernels(platform).cpu_kernels:
        return _kernel_rope(*arrays)
    return xla_rope(*arrays)


@jax.custom_vjp
def _kernel_rope(x_BLHK, cos_BLR, sin_BLR):
    return cpu_kernels.rotary(x_BLHK, cos_BLR, sin_BLR)


def _kernel_rope_fwd(*arrays):
    return _kernel_rope(*arrays), arrays


def _kernel_rope_bwd(arrays, g):
    return jax.vjp(xla_rope, *arrays)[1](g)


_kernel_rope.defvjp(_kernel_rope_fwd, _kernel_rope_bwd)


def xla_rope(x_BLHK, cos_BLR, sin_BLR):
    """``apply_rope`` in XLA ops."""
    r = cos_BLR.shape[-1]
    x_rot, x_pass = x_BLHK[..., :r], x_BLHK[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos_BLR[:, :, None, :].astype(x_BLHK.dtype)
    sin = sin_BLR[:, :, None, :].astype(x_BLHK.dtype)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def attention_bias(key_valid_BS, causal: bool):
    """Additive mask ``[B, 1, L, S]``: 0 where a query may see a key, NEG_INF elsewhere.

    Causality is by index (query i sees keys j <= i), padding by ``key_valid``.
    """
    s = key_valid_BS.shape[-1]
    allowed = key_valid_BS[:, None, None, :]  # [B, 1, 1, S]
    if causal:
        tri = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
        allowed = allowed & tri[None, None]
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def block_causal_bias(q_pos_BL, k_pos_BS, key_valid_BS, block_length: int):
    """Additive mask ``[B, 1, L, S]`` for block-causal attention.

    Blocks are aligned to absolute positions: a query at position p sees every
    valid key whose block ``pos // block_length`` is not after its own, so it is
    bidirectional inside a block and causal across blocks.
    """
    qb = q_pos_BL // block_length
    kb = k_pos_BS // block_length
    allowed = (kb[:, None, :] <= qb[:, :, None]) & key_valid_BS[:, None, :]
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def dot_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal_chunk: int | None = None,
                  platform: str | None = None):
    """Softmax attention with GQA; logits and softmax in float32.

    ``causal_chunk``: the mask is causal by index (query i sees keys j <= i) and
    L == S, so the keys past a query block can be skipped (the same values).
    The implementation is the target platform's (``jmoe.platform``): for CPU with
    jmoe's compiled kernels and float32 inputs the ``jmoe_attention`` kernel
    (``jmoe.cpu_kernels.attention``; its gradient is the XLA path's); otherwise
    ``xla_attention``.
    """
    arrays = (q_BLHK, k_BSNK, v_BSNK, bias_B1LS)
    table = kernels(platform)
    if all(a.dtype == jnp.float32 for a in arrays) and table.cpu_kernels:
        causal = bool(causal_chunk) and q_BLHK.shape[1] == k_BSNK.shape[1]
        return _kernel_attention(causal_chunk if causal else None, *arrays)
    return xla_attention(*arrays, causal_chunk if table.causal_chunks else None,
                         blocked=table.blocked_attention,
                         implementation="xla" if table.platform in (None, "cpu") else None)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_attention(causal_chunk, q_BLHK, k_BSNK, v_BSNK, bias_B1LS):
    return cpu_kernels.attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal=bool(causal_chunk))


def _kernel_attention_fwd(causal_chunk, *arrays):
    return _kernel_attention(causal_chunk, *arrays), arrays


def _kernel_attention_bwd(causal_chunk, arrays, g):
    _, vjp = jax.vjp(lambda *a: xla_attention(*a, causal_chunk, blocked=True), *arrays)
    return vjp(g)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def xla_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal_chunk: int | None = None, *,
                  blocked: bool = False, implementation: str | None = "xla"):
    """``dot_attention`` in XLA ops. ``causal_chunk``: queries go in chunks of this
    many and chunk c computes only its visible keys ``[0, (c+1)*chunk)``: about
    (1 + 1/n)/2 of the score work for n chunks, the same values. (A query with no
    visible key at all, a left pad, is uniform over its chunk's keys instead of all
    keys: its output is never used.) ``blocked``: from ``BLOCKED_MIN_KEYS`` keys on,
    ``blocked_attention`` computes the same thing. Both loops were measured on CPU
    only, so ``jmoe.platform`` turns them on for CPU targets; GPU and TPU targets take
    one ``jax.nn.dot_product_attention`` with ``implementation`` left to XLA (None).
    """
    l, s = q_BLHK.shape[1], k_BSNK.shape[1]
    causal = bool(causal_chunk) and l == s
    if blocked and s >= BLOCKED_MIN_KEYS:
        return blocked_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal=causal)
    if causal and l > causal_chunk:
        return chunked_causal_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, causal_chunk)
    # jax's attention: float32 logits and softmax, the bias added before the softmax,
    # GQA; on CPU its XLA form is ~20% faster than our own 5-D einsum formulation.
    return jax.nn.dot_product_attention(q_BLHK, k_BSNK, v_BSNK, bias=bias_B1LS,
                                        implementation=implementation)


def chunked_causal_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, chunk: int):
    """Causal attention (L == S) in XLA ops with queries in chunks that see keys
    ``[0, hi)`` only. q, k and v go head-major once before the chunk loop: slicing
    the ``[B, L, H, K]`` inputs per chunk made XLA fuse the q/k norm and rotary into
    a transposed copy per chunk (measured on CPU, 4x256 tokens, 4 heads of 64, with
    rotary inputs: 3.07 -> 2.94 ms a layer). On CPU the ``jmoe_attention`` kernel
    usually runs instead (1.64 ms there).
    """
    b, l, h, kd = q_BLHK.shape
    n = k_BSNK.shape[2]
    g = h // n
    q = jnp.transpose(q_BLHK.reshape(b, l, n, g, kd), (0, 2, 3, 1, 4))  # [B, N, G, L, K]
    q = q * jnp.asarray(kd ** -0.5, q.dtype)
    k, v = (jnp.transpose(t, (0, 2, 1, 3)) for t in (k_BSNK, v_BSNK))  # [B, N, S, K]
    outs = []
    for lo in range(0, l, chunk):
        hi = min(lo + chunk, l)
        logits = jnp.einsum("BNGLK,BNSK->BNGLS", q[:, :, :, lo:hi], k[:, :, :hi],
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits + bias_B1LS[:, :, None, lo:hi, :hi], axis=-1)
        outs.append(jnp.einsum("BNGLS,BNSK->BNGLK", probs.astype(v.dtype), v[:, :, :hi],
                               preferred_element_type=jnp.float32).astype(v.dtype))
    out = jnp.concatenate(outs, axis=3)  # [B, N, G, L, K]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, l, h, kd)


# Query chunk of causal attention without a cache (measured on CPU at L=256: chunks of
# 128 cut the attention core ~25%; smaller chunks gain less than their overhead).
CAUSAL_CHUNK = 128
# From this many keys on, attention runs in key blocks with an online softmax: the
# float32 scores of a block stay in cache instead of a [B, H, L, S] array (measured on
# CPU, 4 heads of 64: 1.4-1.9x faster at S=512, 1.7-1.8x at 1024; about even at 256).
BLOCKED_MIN_KEYS = 512
Q_BLOCK, K_BLOCK = 128, 256


def blocked_attention(q_BLHK, k_BSNK, v_BSNK, bias_B1LS, *, causal: bool = False,
                      q_block: int = Q_BLOCK, k_block: int = K_BLOCK):
    """``dot_attention`` in blocks: queries in chunks of ``q_block``, keys in blocks of
    ``k_block`` folded in with an online (running max and sum) float32 softmax.

    ``bias`` is ``[B, 1, L or 1, S]``. ``causal`` (by index, L == S) skips the key
    blocks past a query chunk. A row whose keys are all masked is uniform over the
    keys it visited (a pad: never used).
    """
    b, l, h, kd = q_BLHK.shape
    s, n = k_BSNK.shape[1], k_BSNK.shape[2]
    g = h // n
    pad = -s % k_block
    if pad:
        k_BSNK, v_BSNK = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k_BSNK, v_BSNK))
        bias_B1LS = jnp.pad(bias_B1LS, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=NEG_INF)
    slice_keys = lambda t, j, axis: jax.lax.dynamic_slice_in_dim(t, j * k_block, k_block, axis)
    outs = []
    for lo in range(0, l, q_block):
        hi = min(lo + q_block, l)
        q = q_BLHK[:, lo:hi].reshape(b, hi - lo, n, g, kd) * jnp.asarray(kd ** -0.5, q_BLHK.dtype)
        bias = bias_B1LS[:, :, lo:hi] if bias_B1LS.shape[2] > 1 else bias_B1LS

        def fold(j, carry, q=q, bias=bias):
            m, total, acc = carry
            logits = jnp.einsum("BLNGK,BSNK->BNGLS", q, slice_keys(k_BSNK, j, 1),
                                preferred_element_type=jnp.float32)
            logits = logits + slice_keys(bias, j, 3)[:, :, None]
            m_new = jnp.maximum(m, logits.max(-1))
            rescale = jnp.exp(m - m_new)
            p = jnp.exp(logits - m_new[..., None])
            acc = acc * rescale[..., None] + jnp.einsum(
                "BNGLS,BSNK->BNGLK", p.astype(v_BSNK.dtype), slice_keys(v_BSNK, j, 1),
                preferred_element_type=jnp.float32)
            return m_new, total * rescale + p.sum(-1), acc

        shape = (b, n, g, hi - lo)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (kd,), jnp.float32))
        blocks = -(-(hi if causal else s) // k_block)
        _, total, acc = jax.lax.fori_loop(0, blocks, fold, init)
        out = (acc / total[..., None]).astype(v_BSNK.dtype)  # [B, N, G, Lc, K]
        outs.append(jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, hi - lo, h, kd))
    return jnp.concatenate(outs, axis=1)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: ``down(silu(x @ gate) * (x @ up))``."""

    intermediate_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        d = x_BLD.shape[-1]
        f = self.intermediate_size
        w_gate_DF = self.param("w_gate", logical_init(("embed", "mlp")), (d, f), self.dtype)
        w_up_DF = self.param("w_up", logical_init(("embed", "mlp")), (d, f), self.dtype)
        w_down_FD = self.param("w_down", logical_init(("mlp", "embed")), (f, d), self.dtype)
        h = jax.nn.silu(x_BLD @ w_gate_DF) * (x_BLD @ w_up_DF)
        return h @ w_down_FD


class Attention(nn.Module):
    """Multi-head attention with optional q/k RMSNorm, qkv clipping and partial RoPE.

    ``qk_norm``: ``"whole"`` normalises the full q/k projections before the head
    split (OLMoE), ``"per_head"`` each head separately (LLaDA-MoE, LLaDA2),
    ``"none"`` skips it. Clipping acts after the norm, as in both references.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: str
    eps: float
    clip_qkv: float | None = None
    dtype: jnp.dtype = jnp.float32
    causal: bool = False  # the bias is causal by index: uncached calls skip invisible keys
    platform: str | None = None  # the target's kernel table (jmoe.platform)

    @nn.compact
    def __call__(self, x_BLD, cos_BLR, sin_BLR, bias_B1LS, cache=None, layer: int = 0,
                 valid_BL=None):
        """``(out_BLD, kv)``. With ``cache`` (a ``jmoe.kv_cache.KVCache``) this call's
        keys/values are written into layer ``layer``'s buffers at ``cache.length``, the
        queries attend over the whole buffers (``bias`` is then ``[B, 1, L, S]``) and
        ``kv`` is the updated ``(k_BSNK, v_BSNK)``; without, ``kv`` is None. A
        bidirectional cache's refresh (L == S) attends exactly as the uncached call and
        writes every position; its window calls write only ``valid_BL``'s positions."""
        b, l, d = x_BLD.shape
        h, n, k = self.num_heads, self.num_kv_heads, self.head_dim
        wq = self.param("wq", logical_init(("embed", "q_heads")), (d, h * k), self.dtype)
        wk = self.param("wk", logical_init(("embed", "kv_heads")), (d, n * k), self.dtype)
        wv = self.param("wv", logical_init(("embed", "kv_heads")), (d, n * k), self.dtype)
        wo = self.param("wo", logical_init(("q_heads", "embed")), (h * k, d), self.dtype)
        q, kk, v = x_BLD @ wq, x_BLD @ wk, x_BLD @ wv
        if self.qk_norm == "whole":
            q = RMSNorm(self.eps, self.dtype, name="q_norm")(q)
            kk = RMSNorm(self.eps, self.dtype, name="k_norm")(kk)
        q, kk, v = (t.reshape(b, l, -1, k) for t in (q, kk, v))
        if self.qk_norm == "per_head":
            q = RMSNorm(self.eps, self.dtype, name="q_norm")(q)
            kk = RMSNorm(self.eps, self.dtype, name="k_norm")(kk)
        if self.clip_qkv is not None:
            q, kk, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, kk, v))
        rope = lambda t: apply_rope(t, cos_BLR, sin_BLR, self.platform)
        q, kk = rope(q), rope(kk)
        if cache is None:
            chunk = CAUSAL_CHUNK if self.causal else None
            out = dot_attention(q, kk, v, bias_B1LS, chunk, self.platform)
            return out.reshape(b, l, h * k) @ wo, None
        if cache.bidirectional and l == cache.size:  # refresh: the uncached call's attention
            out = dot_attention(q, kk, v, bias_B1LS, None, self.platform)
            return out.reshape(b, l, h * k) @ wo, cache.write(layer, kk, v)
        fresh = valid_BL if cache.bidirectional else None
        k_BSNK, v_BSNK = cache.write(layer, kk, v, fresh)
        out = dot_attention(q, k_BSNK, v_BSNK, bias_B1LS, platform=self.platform)
        return out.reshape(b, l, h * k) @ wo, (k_BSNK, v_BSNK)


# the LM head's columns per dot on CPU with a low-precision head (see ``vocab_logits``)
CPU_VOCAB_CHUNK = 16384


def vocab_logits(x_BLD, w_DV, platform: str | None):
    """The LM head, ``x_BLD @ w_DV`` ``[B, L, V]`` in float32 (the dot in the weights'
    dtype, as a plain ``@``).

    On CPU with a bfloat16/float16 head the columns go in chunks of
    ``CPU_VOCAB_CHUNK``: XLA:CPU converts a low-precision dot's weight to float32
    first, which for the whole head is a float32 copy of it (1.3 GB for LLaDA-MoE's
    157k x 2048) alive during the dot; chunked, one chunk's copy (128 MiB at D=2048).
    The same values bit for bit: each column is the same dot.
    """
    b, l, _ = x_BLD.shape
    v = w_DV.shape[1]
    if platform != "cpu" or w_DV.dtype == jnp.float32 or v <= CPU_VOCAB_CHUNK:
        return (x_BLD @ w_DV).astype(jnp.float32)
    n = -(-v // CPU_VOCAB_CHUNK)
    c = -(-v // n)

    def chunk(i, out_BLV):
        start = jnp.minimum(i * c, v - c)  # the last chunk overlaps the one before
        w_DC = jax.lax.dynamic_slice_in_dim(w_DV, start, c, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(
            out_BLV, (x_BLD @ w_DC).astype(jnp.float32), start, axis=2)

    return jax.lax.fori_loop(0, n, chunk, jnp.zeros((b, l, v), jnp.float32))
