"""LLaDA2-MoE (LLaDA2.0-mini / -flash) as a pure-functional Flax model.

Shape letters: B batch, L sequence, D model dim, F ffn dim, V vocab, E routed
experts, K experts per token. Diffusion terms: *block* (``attention_block_length``
positions aligned from position 0; attention is block-causal across blocks),
*budget* (a token's number of routed experts; the shared expert always runs).

It reuses the shared layers (``Attention`` with per-head q/k norm and partial
rotary, ``RMSNorm``, ``SwiGLU``), the ``Routing`` assignment list and the expert
backends of ``jmoe.moe``; what differs from OLMoE is the router
(``routing.sigmoid_group_topk``; with ``routing="expert_choice"``
``routing.sigmoid_expert_choice``, see ``route``), the shared expert and the dense
first layers.

Params tree (what ``checkpoints_convert`` maps the HF keys onto):
  embed/embedding [V, D]
  layer_{i}/input_norm/scale, layer_{i}/post_attn_norm/scale [D]
  layer_{i}/attn/{wq, wk, wv, wo}, layer_{i}/attn/{q_norm,k_norm}/scale [K]
  layer_{i}/mlp/{w_gate [D, F], w_up [D, F], w_down [F, D]}        (i < first_k_dense_replace)
  layer_{i}/moe/{router [D, E], expert_bias [E] (float32), w_gate [E, D, F], w_up, w_down}
  layer_{i}/moe/shared/{w_gate, w_up, w_down}                       (num_shared_experts > 0)
  final_norm/scale [D], lm_head [D, V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe import routing as routing_lib
from jmoe import sharding
from jmoe.config import LLaDA2Config
from jmoe.layers import (Attention, RMSNorm, SwiGLU, attention_bias, block_causal_bias,
                         default_init, rope_tables)
from jmoe.models.olmoe import positions_from_mask
from jmoe.moe import expert_compute, layer_aux


def route(config: LLaDA2Config, logits_TE, bias_E, valid_BL, budget_BL, k_max: int):
    """The ``Routing`` of one LLaDA2 MoE layer under ``config.routing``.

    ``token_choice``: ``routing.sigmoid_group_topk`` (group-limited top-k of the
    biased sigmoid scores, per-token budgets allowed). ``expert_choice``:
    ``routing.sigmoid_expert_choice`` within each sequence with k = ``k_max`` and
    ``config.capacity_factor``; the group limit and the expert bias do not apply
    (see there), weights keep token choice's normalisation and
    ``routed_scaling_factor``. Per-token budgets are a ValueError there.
    """
    c = config
    b, l = valid_BL.shape
    normalize = c.num_experts_per_tok > 1  # as the reference: renormalise when top-k > 1
    if c.routing == "expert_choice":
        if budget_BL is not None:
            raise ValueError("per-token experts_per_token budgets apply to routing="
                             "'token_choice'; LLaDA2 with routing='expert_choice' takes a "
                             "scalar k only")
        return routing_lib.sigmoid_expert_choice(
            logits_TE.reshape(b, l, -1), k=k_max, capacity_factor=c.capacity_factor,
            scaling=c.routed_scaling_factor, normalize=normalize, valid_BL=valid_BL)
    if c.routing != "token_choice":
        raise ValueError(f"routing={c.routing!r}: expected 'token_choice' or 'expert_choice'")
    budget_T = None if budget_BL is None else jnp.broadcast_to(budget_BL, (b, l)).reshape(-1)
    return routing_lib.sigmoid_group_topk(
        logits_TE, bias_E, k_max=k_max, n_group=c.n_group, topk_group=c.topk_group,
        scaling=c.routed_scaling_factor, normalize=normalize, budget_T=budget_T,
        valid_T=valid_BL.reshape(-1))


class LLaDA2MoE(nn.Module):
    """Routed experts plus always-on shared experts.

    Routing (``route``): token choice is sigmoid group-limited top-k; expert choice
    has each expert pick its top ``C = ceil(capacity_factor * L * k / E)`` tokens of
    each sequence by sigmoid score. The shared experts run on every token either way.
    aux as ``jmoe.moe.MoEBlock``: ``expert_ids``/``expert_weights`` ``[B, L, K]`` with
    K = k_max for token choice and K = E for expert choice.
    """

    config: LLaDA2Config

    @nn.compact
    def __call__(self, x_BLD, valid_BL, budget_BL=None, k_max=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        b, l, d = x_BLD.shape
        e, f = c.num_experts, c.moe_intermediate_size
        k_max = k_max or c.num_experts_per_tok
        router_DE = self.param("router", default_init, (d, e), dt)
        # the selection bias stays float32: it is tuned in small steps during training
        bias_E = self.param("expert_bias", nn.initializers.zeros, (e,), jnp.float32)
        w_gate = self.param("w_gate", default_init, (e, d, f), dt)
        w_up = self.param("w_up", default_init, (e, d, f), dt)
        w_down = self.param("w_down", default_init, (e, f, d), dt)

        x_TD = x_BLD.reshape(b * l, d)
        logits_TE = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
        r = route(c, logits_TE, bias_E, valid_BL, budget_BL, k_max)
        ep = sharding.expert_parallel_active(c.mesh)
        if ep:
            route_fn = lambda lg, v, k, p: route(c, lg, p["expert_bias"], v, k, k_max)
            y_BLD, dropped = sharding.expert_parallel_moe(
                c.mesh, x_BLD, logits_TE.reshape(b, l, e), valid_BL, budget_BL, w_gate, w_up,
                w_down, route_fn=route_fn, route_params={"expert_bias": bias_E},
                backend=c.moe_backend, expert_choice=c.routing == "expert_choice",
                capacity_factor=c.ep_capacity_factor)
            y_TD = y_BLD.reshape(b * l, d)
        else:
            y_TD = expert_compute(c.moe_backend, x_TD, r, w_gate, w_up, w_down)
        y_BLD = y_TD.reshape(b, l, d).astype(x_BLD.dtype)
        if c.num_shared_experts:
            y_BLD = y_BLD + SwiGLU(f * c.num_shared_experts, dt, name="shared")(x_BLD)
        aux = layer_aux(r, logits_TE, valid_BL, c.num_experts_per_tok)
        if ep:
            aux["ep_dropped"] = dropped
        return y_BLD, aux


class LLaDA2Layer(nn.Module):
    config: LLaDA2Config
    dense: bool

    @nn.compact
    def __call__(self, x_BLD, cos, sin, bias, valid_BL, budget_BL, k_max, kv_cache=None,
                 offset=None):
        """``(x_BLD, aux)``; with ``kv_cache`` also the updated ``(k_BSNK, v_BSNK)``."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        h = RMSNorm(c.rms_norm_eps, dt, name="input_norm")(x_BLD)
        attn = Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.qk_norm, c.rms_norm_eps,
                         None, dt, name="attn")(h, cos, sin, bias, kv_cache, offset)
        attn, kv = attn if kv_cache is not None else (attn, None)
        x_BLD = x_BLD + attn
        h = RMSNorm(c.rms_norm_eps, dt, name="post_attn_norm")(x_BLD)
        if self.dense:
            out = x_BLD + SwiGLU(c.intermediate_size, dt, name="mlp")(h), None
        else:
            y, aux = LLaDA2MoE(c, name="moe")(h, valid_BL, budget_BL, k_max)
            out = x_BLD + y, aux
        return out if kv_cache is None else out + (kv,)


class LLaDA2Model(nn.Module):
    """``apply(params, tokens_BL, valid_BL, budget_BL, k_max) -> (logits_BLV, aux)``.

    aux stacks the MoE layers' aux over a leading axis (dense layers have none).
    With ``cache`` (``{"k", "v"}``: ``[layers, B, S, N, K]`` buffers over absolute
    positions ``0..S-1``, see ``empty_kv_cache``) the call is a *cached block call*:
    ``tokens_BL`` sit at absolute positions ``offset .. offset + L - 1`` (no padding),
    their keys/values are written into the buffers there, queries attend
    block-causally to buffer positions ``< offset + L``, and the call returns
    ``(logits_BLV, aux, cache)``. Keys/values of earlier blocks are read, not recomputed.
    A cached call needs ``routing="token_choice"``: under expert choice a token's
    experts depend on the whole sequence, so it is a ValueError (generate with
    ``cache=False``).
    """

    config: LLaDA2Config

    @nn.compact
    def __call__(self, tokens_BL, valid_BL=None, budget_BL=None, k_max=None, cache=None,
                 offset=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        if valid_BL is None:
            valid_BL = jnp.ones(tokens_BL.shape, bool)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt,
                         embedding_init=default_init, name="embed")
        x = embed(tokens_BL)
        if cache is not None:
            if c.routing == "expert_choice":
                raise ValueError(
                    "routing='expert_choice' cannot run a cached block call: each expert "
                    "picks among the whole sequence's tokens, which a call on one block "
                    "does not see; generate with cache=False (jmoe.generate(..., cache=False))")
            pos, bias = _cached_block_geometry(c, tokens_BL.shape, cache["k"].shape[2], offset)
        else:
            pos = positions_from_mask(valid_BL)
            if c.attention_block_length:
                bias = block_causal_bias(pos, pos, valid_BL, c.attention_block_length)
            else:
                bias = attention_bias(valid_BL, causal=False)
        cos, sin = rope_tables(pos, c.rotary_dim, c.rope_theta)
        auxes, ks, vs = [], [], []
        for i in range(c.num_layers):
            layer = LLaDA2Layer(c, dense=i < c.first_k_dense_replace, name=f"layer_{i}")
            if cache is None:
                x, aux = layer(x, cos, sin, bias, valid_BL, budget_BL, k_max)
            else:
                x, aux, (k_i, v_i) = layer(x, cos, sin, bias, valid_BL, budget_BL, k_max,
                                           (cache["k"][i], cache["v"][i]), offset)
                ks.append(k_i)
                vs.append(v_i)
            if aux is not None:
                auxes.append(aux)
        x = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = x @ self.param("lm_head", default_init, (c.hidden_size, c.vocab_size), dt)
        if not auxes:
            raise ValueError("LLaDA2 config has no MoE layer (first_k_dense_replace == num_layers)")
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        if cache is not None:
            return logits.astype(jnp.float32), aux, {"k": jnp.stack(ks), "v": jnp.stack(vs)}
        return logits.astype(jnp.float32), aux


def _cached_block_geometry(c: LLaDA2Config, shape_BL, s: int, offset):
    """Positions ``[B, L]`` and block-causal bias ``[B, 1, L, S]`` of a cached block call."""
    if not c.attention_block_length:
        raise ValueError("a cached block call needs block-causal attention: set "
                         "attention_block_length (got None)")
    b, l = shape_BL
    q_pos_BL = jnp.broadcast_to(offset + jnp.arange(l, dtype=jnp.int32), (b, l))
    k_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    # buffer slots past this block hold nothing yet (or stale values): never visible
    bias = block_causal_bias(q_pos_BL, k_pos_BS, k_pos_BS < offset + l, c.attention_block_length)
    return q_pos_BL, bias


def empty_kv_cache(config: LLaDA2Config, batch: int, length: int):
    """Zero K/V buffers ``{"k", "v"}: [layers, B, S, N, K]`` for cached block calls."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    z = jnp.zeros(shape, jnp.dtype(config.dtype))
    return {"k": z, "v": z}
