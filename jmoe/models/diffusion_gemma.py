"""DiffusionGemma on jmoe's decoder stack: the causal encoder and the canvas decoder.

Shape letters: B batch, L the call's tokens (a prompt, a finished canvas, or the canvas
being denoised: C), S cache buffer positions, D model dim, V vocab, H query heads,
N kv heads, K head dim. Diffusion terms: the *canvas* is the block of ``canvas_length``
positions being denoised (no mask token: positions not yet accepted hold random
tokens); *self-conditioning* feeds the previous step's logits back into the canvas
embedding.

One module, ``DiffusionGemmaStack``, with one params tree for both passes (transformers
ties the encoder's weights to the decoder's, except the per-layer ``layer_scalar``s,
which it keeps untied: ``layer_{i}/encoder_layer_scalar`` and ``layer_{i}/layer_scalar``):

* ``mode="encode"``: causal attention over the tokens (sliding layers: the last
  ``sliding_window`` positions, the query's own included). Without a cache, positions
  count from each row's first real token and padding is never attended to (as every
  jmoe family's uncached call). With a cache (``new_cache``) the tokens sit at absolute
  positions ``offset ..`` in every row, their K/V are written at ``offset`` (sliding
  layers keep the whole length and mask to the window: one buffer layout for both
  layer kinds), and the cache's ``key_valid`` records which positions are real.
* ``mode="decode"``: the canvas at positions ``offset .. offset + C - 1`` attends
  bidirectionally to every canvas position and to the cached keys ``< offset`` that are
  real (sliding layers: only the last ``sliding_window - 1`` of them, as transformers'
  sliding cache keeps them); it writes nothing. Its input embedding is
  ``RMSNorm_noscale(E[tok] * sqrt(D) + SC(softmax(self_cond) @ E * sqrt(D)))``, SC a
  GeGLU behind an RMSNorm; no self-conditioning logits means a zero signal.

Both return soft-capped float32 logits ``tanh(l / c) * c`` of the tied LM head.

Params tree:
  embed/embedding [V, D]; final_norm/scale [D]
  self_cond/{pre_norm/scale [D], w_gate [D, F], w_up [D, F], w_down [F, D]}
  layer_{i}/{input_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm, pre_moe_norm,
             post_moe_norm, post_ffw_norm}/scale [D]
  layer_{i}/attn/{wq [D, H*K], wk [D, N*K], wv [D, N*K] (sliding only), wo [H*K, D],
                  q_norm/scale [K], k_norm/scale [K]}   (K, N: the layer kind's)
  layer_{i}/mlp/{w_gate [D, F], w_up [D, F], w_down [F, D]}   (GeGLU, F intermediate_size)
  layer_{i}/moe/{router [D, E], router_scale [D], per_expert_scale [E] (float32),
                 w_gate, w_up [E, D, F_e], w_down [E, F_e, D]}
  layer_{i}/layer_scalar [1], layer_{i}/encoder_layer_scalar [1]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import routing as routing_lib
from jmoe.kv_cache import KVCache
from jmoe.layers import NEG_INF, RMSNorm, apply_rope, dot_attention, logical_init
from jmoe.moe import MoE

SLIDING, FULL = "sliding_attention", "full_attention"


def rms_noscale(x, eps: float):
    """Scale-free RMSNorm in float32, cast back (transformers' ``with_scale=False``)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class GeGLU(nn.Module):
    """Dense ``down(gelu_tanh(x @ gate) * (x @ up))`` (transformers' Gemma MLP)."""

    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        d, f = x_BLD.shape[-1], self.intermediate_size
        w_gate = self.param("w_gate", logical_init(("embed", "mlp")), (d, f), self.dtype)
        w_up = self.param("w_up", logical_init(("embed", "mlp")), (d, f), self.dtype)
        w_down = self.param("w_down", logical_init(("mlp", "embed")), (f, d), self.dtype)
        return (gelu_tanh(x_BLD @ w_gate) * (x_BLD @ w_up)) @ w_down


def inv_freq(config, kind: str):
    """RoPE inverse frequencies ``[K/2]`` float32 of a layer kind: plain RoPE over the whole
    head (sliding), or "proportional" RoPE (full: the first ``int(fraction * K / 2)``
    frequencies ``theta^(-2i/K)``, the rest 0, so those pairs pass unrotated)."""
    if kind == SLIDING:
        k = config.head_dim
        return 1.0 / (config.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    k = config.full_head_dim
    n_rot = int(config.full_rotary_fraction * k // 2)
    freqs = 1.0 / (config.full_rope_theta ** (jnp.arange(0, 2 * n_rot, 2, dtype=jnp.float32) / k))
    return jnp.concatenate([freqs, jnp.zeros((k // 2 - n_rot,), jnp.float32)])


def rope_for(config, kind: str, pos_BL):
    freqs = pos_BL.astype(jnp.float32)[..., None] * inv_freq(config, kind)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # NeoX layout over the whole head
    return jnp.cos(emb), jnp.sin(emb)


def encoder_bias(q_pos_BL, k_pos_BS, key_valid_BS, window: int | None):
    """Causal (and, with ``window``, sliding: ``q - k < window``) additive mask ``[B,1,L,S]``."""
    diff = q_pos_BL[:, :, None] - k_pos_BS[:, None, :]
    allowed = (diff >= 0) & key_valid_BS[:, None, :]
    if window is not None:
        allowed = allowed & (diff < window)
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def decoder_bias(offset, key_valid_BS, c: int, window: int | None):
    """Mask ``[B, 1, 1, S + C]`` of a canvas over the cache buffer and itself: cached keys
    ``< offset`` that are real (sliding: ``>= offset - window + 1``), every canvas key."""
    b, s = key_valid_BS.shape
    k_pos = jnp.arange(s, dtype=jnp.int32)
    cached = key_valid_BS & (k_pos < offset)[None]
    if window is not None:
        cached = cached & (k_pos > offset - window)[None]
    allowed = jnp.concatenate([cached, jnp.ones((b, c), bool)], axis=1)
    return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


class GemmaAttention(nn.Module):
    config: Any
    kind: str

    @nn.compact
    def __call__(self, x_BLD, cos, sin, bias, kv_extra=None, cache_kv=None):
        """``(out_BLD, kv)``: ``kv`` this call's ``(k_BLNK, v_BLNK)``, or with ``cache_kv`` (a
        function writing them into the layer's buffers, the encoder) the written buffers,
        which are also what the queries attend over. ``kv_extra``: keys/values placed
        before this call's (the decoder: the cache's buffers)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, l, d = x_BLD.shape
        h = c.num_heads
        n, k = ((c.num_kv_heads, c.head_dim) if self.kind == SLIDING
                else (c.full_num_kv_heads, c.full_head_dim))
        wq = self.param("wq", logical_init(("embed", "q_heads")), (d, h * k), dt)
        wk = self.param("wk", logical_init(("embed", "kv_heads")), (d, n * k), dt)
        wo = self.param("wo", logical_init(("q_heads", "embed")), (h * k, d), dt)
        q = (x_BLD @ wq).reshape(b, l, h, k)
        k_raw = (x_BLD @ wk).reshape(b, l, n, k)
        if self.kind == SLIDING:
            wv = self.param("wv", logical_init(("embed", "kv_heads")), (d, n * k), dt)
            v = (x_BLD @ wv).reshape(b, l, n, k)
        else:  # full layers: V is the raw K projection (attention_k_eq_v)
            v = k_raw
        q = apply_rope(RMSNorm(c.rms_norm_eps, dt, name="q_norm")(q), cos, sin, c.platform)
        kk = apply_rope(RMSNorm(c.rms_norm_eps, dt, name="k_norm")(k_raw), cos, sin, c.platform)
        v = rms_noscale(v, c.rms_norm_eps)
        keys, vals = kk, v
        if cache_kv is not None:
            keys, vals = cache_kv(kk, v)
            kk, v = keys, vals
        if kv_extra is not None:
            keys = jnp.concatenate([kv_extra[0].astype(kk.dtype), kk], axis=1)
            vals = jnp.concatenate([kv_extra[1].astype(v.dtype), v], axis=1)
        out = _scale_free_attention(q, keys, vals, bias, c.platform)
        return out.reshape(b, l, h * k) @ wo, (kk, v)


def _scale_free_attention(q_BLHK, k_BSNK, v_BSNK, bias, platform):
    """Attention with scale 1.0 (Gemma-4's q/k norms replace the 1/sqrt(K) scale). float32:
    q times sqrt(K) through jmoe's attention (its kernels divide by sqrt(K) again: a
    relative error of float32 rounding); other dtypes: jax's attention with ``scale=1``."""
    kd = q_BLHK.shape[-1]
    if q_BLHK.dtype == jnp.float32:
        return dot_attention(q_BLHK * jnp.float32(math.sqrt(kd)), k_BSNK, v_BSNK, bias,
                             None, platform)
    return jax.nn.dot_product_attention(q_BLHK, k_BSNK, v_BSNK, bias=bias, scale=1.0)


class GemmaLayer(nn.Module):
    config: Any
    kind: str

    @nn.compact
    def __call__(self, x_BLD, cos, sin, bias, valid_BL, budget, encoder: bool,
                 kv_extra=None, cache_kv=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        norm = lambda name: RMSNorm(c.rms_norm_eps, dt, name=name)
        scalars = {n: self.param(n, logical_init((None,), nn.initializers.ones), (1,), dt)
                   for n in ("layer_scalar", "encoder_layer_scalar")}
        attn, kv = GemmaAttention(c, self.kind, name="attn")(
            norm("input_norm")(x_BLD), cos, sin, bias, kv_extra, cache_kv)
        x_BLD = x_BLD + norm("post_attn_norm")(attn)
        dense = norm("post_mlp_norm")(GeGLU(c.intermediate_size, dt, name="mlp")(
            norm("pre_mlp_norm")(x_BLD)))
        # the router reads the residual stream itself; the experts its own pre-norm
        y, aux = MoE(c, name="moe")(norm("pre_moe_norm")(x_BLD), valid_BL, budget,
                                    x_route_BLD=x_BLD)
        x_BLD = x_BLD + norm("post_ffw_norm")(dense + norm("post_moe_norm")(y))
        scalar = scalars["encoder_layer_scalar" if encoder else "layer_scalar"]
        return x_BLD * scalar, aux, kv


class SelfConditioning(nn.Module):
    """``x + GeGLU(RMSNorm(softmax(logits) @ E * sqrt(D)))`` (transformers'
    DiffusionGemmaSelfConditioning before its scale-free post-norm); params
    ``pre_norm/scale``, ``w_gate``, ``w_up``, ``w_down``, created in every mode."""

    config: Any

    @nn.compact
    def __call__(self, embed, scale, x, self_cond_BLV, mask_B):
        c = self.config
        dt = jnp.dtype(c.dtype)
        d, f = c.hidden_size, c.intermediate_size
        w_gate = self.param("w_gate", logical_init(("embed", "mlp")), (d, f), dt)
        w_up = self.param("w_up", logical_init(("embed", "mlp")), (d, f), dt)
        w_down = self.param("w_down", logical_init(("mlp", "embed")), (f, d), dt)
        pre = RMSNorm(c.rms_norm_eps, dt, name="pre_norm")
        if self_cond_BLV is None:
            pre(x)  # creates pre_norm's scale at init
            return x  # SC(0) is exactly 0 (RMSNorm(0) = 0, gelu(0) * 0 = 0)
        probs = jax.nn.softmax(self_cond_BLV.astype(jnp.float32), axis=-1).astype(dt)
        soft = (probs @ embed.embedding) * scale
        if mask_B is not None:
            soft = soft * jnp.asarray(mask_B, dt)[:, None, None]
        h = pre(soft)
        return x + (gelu_tanh(h @ w_gate) * (h @ w_up)) @ w_down


class DiffusionGemmaStack(nn.Module):
    """``apply(params, tokens_BL, valid_BL, budget, cache=None, *, mode="encode",
    offset=None, self_cond_BLV=None, self_cond_mask_B=None) -> (logits_BLV, aux, cache)``.

    ``mode="encode"``: see the module docstring; with ``cache`` its K/V are written at
    ``offset`` (default ``cache.length``) and the cache comes back with
    ``length = offset + L``. ``mode="decode"`` needs ``cache`` and ``offset`` and returns
    it unchanged. ``self_cond_BLV``: the previous step's logits (None: a zero signal);
    ``self_cond_mask_B``: bool ``[B]``, False rows get a zero signal (a loop's first step).
    """

    config: Any

    @nn.compact
    def __call__(self, tokens_BL, valid_BL, budget: routing_lib.Budget, cache=None, *,
                 mode: str = "encode", offset=None, self_cond_BLV=None, self_cond_mask_B=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, l = tokens_BL.shape
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt,
                         embedding_init=logical_init(("vocab", "embed")), name="embed")
        scale = jnp.asarray(math.sqrt(c.hidden_size), dt)  # transformers: in the weights' dtype
        x = embed(tokens_BL) * scale
        sc_x = SelfConditioning(c, name="self_cond")(embed, scale, x, self_cond_BLV,
                                                     self_cond_mask_B)
        if mode == "decode":
            if cache is None or offset is None:
                raise ValueError("mode='decode' needs the encoder's cache and the canvas offset")
            x = rms_noscale(sc_x, c.rms_norm_eps)
        elif mode != "encode":
            raise ValueError(f"mode={mode!r}: expected 'encode' or 'decode'")
        if offset is None and cache is not None:
            offset = cache.length
        offset = None if offset is None else jnp.asarray(offset, jnp.int32)
        pos, biases, key_valid = self._masks(mode, valid_BL, cache, offset, l)
        auxes, ks, vs = [], [], []
        for i, kind in enumerate(c.layer_types):
            cos, sin = rope_for(c, kind, pos)
            kv_extra = cache_kv = None
            if mode == "decode":
                kv_extra = (cache.k[i], cache.v[i])
            elif cache is not None:
                cache_kv = _writer(cache, i, offset)
            x, aux, kv = GemmaLayer(c, kind, name=f"layer_{i}")(
                x, cos, sin, biases[kind], valid_BL, budget.for_layer(i), mode == "encode",
                kv_extra, cache_kv)
            auxes.append(aux)
            ks.append(kv[0])
            vs.append(kv[1])
        x = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(x)
        logits = embed.attend(x).astype(jnp.float32)
        cap = jnp.float32(c.final_logit_softcapping)
        logits = jnp.tanh(logits / cap) * cap
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        if mode == "encode" and cache is not None:
            cache = cache.replace(k=tuple(ks), v=tuple(vs), length=offset + l,
                                  key_valid=key_valid)
        return logits, aux, cache

    def _masks(self, mode, valid_BL, cache, offset, l):
        """Positions ``[B, L]``, the additive mask per layer kind, the cache's new
        ``key_valid`` (encoder calls with a cache) or None."""
        c = self.config
        b = valid_BL.shape[0]
        if mode == "decode":
            pos = jnp.broadcast_to(offset + jnp.arange(l, dtype=jnp.int32), (b, l))
            return pos, {kind: decoder_bias(offset, cache.key_valid, l,
                                            c.sliding_window if kind == SLIDING else None)
                         for kind in (SLIDING, FULL)}, None
        if cache is None:
            pos = jnp.maximum(jnp.cumsum(valid_BL.astype(jnp.int32), -1) - 1, 0)
            idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
            return pos, {kind: encoder_bias(idx, idx, valid_BL,
                                            c.sliding_window if kind == SLIDING else None)
                         for kind in (SLIDING, FULL)}, None
        pos = jnp.broadcast_to(offset + jnp.arange(l, dtype=jnp.int32), (b, l))
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, valid_BL, offset, 1)
        s = cache.size
        k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        return pos, {kind: encoder_bias(pos, k_pos, key_valid,
                                        c.sliding_window if kind == SLIDING else None)
                     for kind in (SLIDING, FULL)}, key_valid


def _put(buf, new, offset):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), offset, axis=1)


def _writer(cache, i, offset):
    return lambda k, v: (_put(cache.k[i], k, offset), _put(cache.v[i], v, offset))


def new_cache(config, batch: int, length: int) -> KVCache:
    """Empty encoder K/V buffers ``[B, S, N, K]`` per layer (each layer kind its own N and K;
    sliding layers keep the whole length too), ``key_valid`` all False, ``length`` 0."""
    ks = []
    for i in range(config.num_layers):
        n, k = config.layer_geometry(i)
        ks.append(jnp.zeros((batch, length, n, k), jnp.dtype(config.dtype)))
    return KVCache(k=tuple(ks), v=tuple(ks), length=jnp.zeros((), jnp.int32),
                   key_valid=jnp.zeros((batch, length), bool))
