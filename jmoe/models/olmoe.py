"""The OLMoE architecture as a pure-functional Flax model.

Causal, it is OLMoE-1B-7B; bidirectional (``causal=False``) and with a mask token,
it is the LLaDA-MoE-7B masked-diffusion model.

Shape letters: B batch, L sequence, D model dim, V vocab, E experts, K experts per
token. Diffusion terms: *mask* (the mask token standing for a not-yet-generated
position), *budget* (a token's number of experts, ``experts_per_token``).

Params tree (what ``checkpoints_convert`` maps HF keys onto):
  embed/embedding [V, D]
  layer_{i}/input_norm/scale [D]
  layer_{i}/attn/{wq [D, H*K], wk [D, N*K], wv [D, N*K], wo [H*K, D]}
  layer_{i}/attn/{q_norm,k_norm}/scale  [H*K] / [N*K] (whole) or [K] (per_head)
  layer_{i}/post_attn_norm/scale [D]
  layer_{i}/moe/{router [D, E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]}
  final_norm/scale [D]
  lm_head [D, V]   (absent when tie_word_embeddings)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jmoe.config import OlmoeConfig
from jmoe.layers import Attention, RMSNorm, attention_bias, default_init, rope_tables
from jmoe.moe import MoEBlock


def positions_from_mask(valid_BL):
    """Positions count from each sequence's first real token (left padding is free)."""
    return jnp.maximum(jnp.cumsum(valid_BL.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderLayer(nn.Module):
    config: OlmoeConfig

    @nn.compact
    def __call__(self, x_BLD, cos, sin, bias, valid_BL, budget_BL, k_max):
        c = self.config
        dt = jnp.dtype(c.dtype)
        h = RMSNorm(c.rms_norm_eps, dt, name="input_norm")(x_BLD)
        x_BLD = x_BLD + Attention(c.num_heads, c.num_kv_heads, c.head_dim, c.qk_norm,
                                  c.rms_norm_eps, c.clip_qkv, dt, c.causal,
                                  name="attn")(h, cos, sin, bias)
        h = RMSNorm(c.rms_norm_eps, dt, name="post_attn_norm")(x_BLD)
        y, aux = MoEBlock(c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                          c.norm_topk_prob, c.moe_backend, dt, c.routing, c.capacity_factor,
                          c.mesh, c.ep_capacity_factor, name="moe")(
                              h, valid_BL, budget_BL, k_max)
        return x_BLD + y, aux


class OlmoeModel(nn.Module):
    """``apply(params, tokens_BL, valid_BL, budget_BL, k_max) -> (logits_BLV, aux)``.

    aux stacks each layer's MoE aux over a leading layer axis.
    """

    config: OlmoeConfig

    @nn.compact
    def __call__(self, tokens_BL, valid_BL=None, budget_BL=None, k_max=None):
        c = self.config
        dt = jnp.dtype(c.dtype)
        if valid_BL is None:
            valid_BL = jnp.ones(tokens_BL.shape, bool)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt,
                         embedding_init=default_init, name="embed")
        x = embed(tokens_BL)
        cos, sin = rope_tables(positions_from_mask(valid_BL), c.rotary_dim, c.rope_theta)
        bias = attention_bias(valid_BL, c.causal)
        auxes = []
        for i in range(c.num_layers):
            x, aux = DecoderLayer(c, name=f"layer_{i}")(x, cos, sin, bias, valid_BL, budget_BL,
                                                        k_max)
            auxes.append(aux)
        x = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            lm_head = self.param("lm_head", default_init, (c.hidden_size, c.vocab_size), dt)
            logits = x @ lm_head
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        return logits.astype(jnp.float32), aux
