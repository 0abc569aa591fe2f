"""The one decoder stack: every jmoe family is a config of it.

Shape letters: B batch, L sequence (the call's tokens), S key positions (a cache's
buffers), D model dim, V vocab, E experts. Diffusion terms: *mask* (the mask token on
a position not yet generated), *block* (``attention_block_length`` positions aligned
from position 0; block-causal attention sees its own and earlier blocks), *budget*
(a token's number of routed experts, ``jmoe.routing.Budget``).

A family chooses (all in its config): the router (``config.router``: softmax top-k
for OLMoE / LLaDA-MoE, sigmoid group-limited top-k for LLaDA2) and ``routing``
(token or expert choice), ``num_shared_experts``, dense first layers
(``first_k_dense_replace`` with ``intermediate_size``), the attention mask
(``causal``, ``attention_block_length``), q/k norm (``qk_norm``: whole or per head),
``clip_qkv``, ``rotary_fraction`` and tied embeddings.

Params tree (what the key tables of ``jmoe.hf_keys`` map HF keys onto):
  embed/embedding [V, D]
  layer_{i}/input_norm/scale, layer_{i}/post_attn_norm/scale [D]
  layer_{i}/attn/{wq [D, H*K], wk [D, N*K], wv [D, N*K], wo [H*K, D]}
  layer_{i}/attn/{q_norm,k_norm}/scale  [H*K] / [N*K] (whole) or [K] (per_head)
  layer_{i}/mlp/{w_gate [D, F], w_up [D, F], w_down [F, D]}      (i < first_k_dense_replace)
  layer_{i}/moe/{router [D, E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]}
  layer_{i}/moe/expert_bias [E] (float32; the sigmoid router)
  layer_{i}/moe/shared/{w_gate, w_up, w_down}                     (num_shared_experts > 0)
  final_norm/scale [D], lm_head [D, V] (absent when tie_word_embeddings)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import routing as routing_lib
from jmoe.kv_cache import KVCache
from jmoe.layers import (Attention, RMSNorm, SwiGLU, attention_bias, block_causal_bias,
                         logical_init, rope_tables, vocab_logits)
from jmoe.platform import kernels
from jmoe.moe import MoE


def positions_from_mask(valid_BL):
    """Positions count from each sequence's first real token (left padding is free)."""
    return jnp.maximum(jnp.cumsum(valid_BL.astype(jnp.int32), axis=-1) - 1, 0)


def mask_bias(config, valid_BL):
    """Positions ``[B, L]`` and the additive mask ``[B, 1, L, L]`` of an uncached call."""
    pos = positions_from_mask(valid_BL)
    if config.mask_kind == "block_causal":
        return pos, block_causal_bias(pos, pos, valid_BL, config.attention_block_length)
    return pos, attention_bias(valid_BL, config.mask_kind == "causal")


class DecoderLayer(nn.Module):
    config: Any
    dense: bool  # a dense SwiGLU MLP instead of the MoE (the first_k_dense_replace layers)

    @nn.compact
    def __call__(self, x_BLD, cos, sin, bias, valid_BL, budget, cache, index: int):
        """``(x_BLD, aux or None, kv or None)``: the layer's output, its MoE aux and, with
        ``cache``, its updated K/V buffers."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        h = RMSNorm(c.rms_norm_eps, dt, name="input_norm")(x_BLD)
        attn, kv = Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.qk_norm,
                             c.rms_norm_eps, c.clip_qkv, dt, c.mask_kind == "causal",
                             c.platform, name="attn")(h, cos, sin, bias, cache, index, valid_BL)
        x_BLD = x_BLD + attn
        h = RMSNorm(c.rms_norm_eps, dt, name="post_attn_norm")(x_BLD)
        if self.dense:
            return x_BLD + SwiGLU(c.intermediate_size, dt, name="mlp")(h), None, kv
        y, aux = MoE(c, name="moe")(h, valid_BL, budget)
        return x_BLD + y, aux, kv


class Decoder(nn.Module):
    """``apply(params, tokens_BL, valid_BL, budget, cache) -> (logits_BLV, aux, cache)``.

    ``valid_BL`` marks real tokens (padding is never routed and never attended to);
    ``budget`` a ``jmoe.routing.Budget``; aux stacks the MoE layers' aux over a leading
    axis. Without ``cache`` positions count from each row's first real token. With
    ``cache`` (a ``jmoe.kv_cache.KVCache``) the tokens sit at absolute positions
    ``cache.length ..`` in every row, their K/V are written there, queries attend over
    the buffers under the cache's mask, and the returned cache has ``length + L``. A
    bidirectional cache (``KVCache.bidirectional``) takes its positions from the cache;
    a call on all its ``S`` positions (a refresh) is the uncached call that also writes
    every K/V, a shorter one writes only its valid tokens' K/V.
    Logits are float32.
    """

    config: Any

    @nn.compact
    def __call__(self, tokens_BL, valid_BL, budget: routing_lib.Budget, cache: KVCache = None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt,
                         embedding_init=logical_init(("vocab", "embed")), name="embed")
        x = embed(tokens_BL)
        if cache is None or (cache.bidirectional and tokens_BL.shape[1] == cache.size):
            # no cache, or a bidirectional cache's refresh: the uncached call's mask
            pos, bias = mask_bias(c, valid_BL)
        else:
            pos = cache.positions(*tokens_BL.shape)
            bias = cache.mask_bias(pos)
        cos, sin = rope_tables(pos, c.rotary_dim, c.rope_theta)
        auxes, ks, vs = [], [], []
        for i in range(c.num_layers):
            layer = DecoderLayer(c, dense=i < c.first_k_dense_replace, name=f"layer_{i}")
            moe_budget = budget.for_layer(max(i - c.first_k_dense_replace, 0))
            x, aux, kv = layer(x, cos, sin, bias, valid_BL, moe_budget, cache, i)
            if aux is not None:
                auxes.append(aux)
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        x = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = vocab_logits(x, self.param("lm_head", logical_init(("embed", "vocab")),
                                                (c.hidden_size, c.vocab_size), dt),
                                  kernels(c.platform).platform)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        if cache is not None:
            cache = cache.replace(k=tuple(ks), v=tuple(vs), length=cache.length + tokens_BL.shape[1])
        return logits.astype(jnp.float32), aux, cache
