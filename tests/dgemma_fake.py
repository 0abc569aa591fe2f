"""A fake DiffusionGemma for the sampler's tests: the model/sampler contract's three
functions (``encode_call``, ``denoise_call``, ``new_encoder_cache``) as a tiny
deterministic function of the cache's tokens, the canvas and the self-conditioning
logits, with peaked, position-dependent logits. Not a model: the sampler's rules are
what the tests check, on logits both the library and the reference loop see.

The cache holds the encoded tokens ``tok [B, S]`` and their validity. A canvas at
positions ``offset .. offset + C - 1`` has a target token per position,
``(ctx + 3 * position) % V`` with ``ctx`` the sum of the valid cached tokens before
``offset`` (weighted by position), and logits ``sharp * (1 + agree) * onehot(target)``
+ ``0.7 * W[canvas token]`` + ``0.5 * softmax(self_cond)``, ``agree`` the fraction of
canvas positions already on their target (so denoising converges), ``sharp`` a
per-row constant from ``ctx``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.config import MoEConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeDGConfig(MoEConfig):
    canvas_length: int = 8
    family = "diffusion_gemma"
    default_convention = "diffusion_gemma"


def make_config(**kw):
    base = dict(vocab_size=23, hidden_size=8, num_layers=2, num_heads=1, num_kv_heads=1,
                head_dim=8, moe_intermediate_size=8, num_experts=8, num_experts_per_tok=4,
                causal=True, eos_token_id=2, pad_token_id=0, max_position_embeddings=512)
    base.update(kw)
    return FakeDGConfig(**base)


def make_params(config, seed=0):
    rng = np.random.default_rng(seed)
    v = config.vocab_size
    return {"w": jnp.asarray(rng.normal(size=(v, v)), jnp.float32),
            "sharp": jnp.asarray(rng.uniform(0.5, 6.0, size=(v,)), jnp.float32)}


def new_encoder_cache(config, batch, length):
    return {"tok": jnp.zeros((batch, length), jnp.int32),
            "valid": jnp.zeros((batch, length), bool)}


def encode_call(params, tokens_BL, valid_BL, budget_BL, *, config, opts, cache, offset):
    cache = {"tok": jax.lax.dynamic_update_slice_in_dim(cache["tok"], tokens_BL, offset, 1),
             "valid": jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BL, offset, 1)}
    b, l = tokens_BL.shape
    logits = jnp.zeros((b, l, config.vocab_size), jnp.float32)
    work = jnp.stack([jnp.where(valid_BL, budget_BL, 0).sum(), jnp.int32(0)]).astype(jnp.int32)
    return logits, work, cache


def logits_of(params, canvas_BC, cache_tok_BS, cache_valid_BS, offset, self_cond_BCV, vocab,
              self_cond_mask_B=None):
    """The fake's logits ``[B, C, V]`` (jnp; the reference calls it with NumPy inputs);
    rows with ``self_cond_mask_B`` False get no self-conditioning (as ``None``)."""
    s = cache_tok_BS.shape[1]
    before = cache_valid_BS & (jnp.arange(s) < offset)
    ctx_B = jnp.sum(jnp.where(before, cache_tok_BS * (jnp.arange(s) % 5 + 1), 0), -1)
    c = canvas_BC.shape[1]
    target_BC = (ctx_B[:, None] + 3 * (offset + jnp.arange(c))) % vocab
    agree_B = jnp.mean((canvas_BC == target_BC).astype(jnp.float32), -1)
    sharp_B = params["sharp"][ctx_B % vocab]
    logits = (sharp_B * (1.0 + agree_B))[:, None, None] * jax.nn.one_hot(target_BC, vocab)
    logits = logits + 1.2 * params["w"][canvas_BC]
    if self_cond_BCV is not None:
        sc = 0.5 * jax.nn.softmax(self_cond_BCV, -1)
        if self_cond_mask_B is not None:
            sc = jnp.where(jnp.asarray(self_cond_mask_B)[:, None, None], sc, 0.0)
        logits = logits + sc
    return logits.astype(jnp.float32)


def denoise_call(params, canvas_BC, budget_BC, *, config, opts, cache, offset,
                 self_cond_BCV=None, expert_set=None, refresh_set=None, self_cond_mask_B=None):
    logits = logits_of(params, canvas_BC, cache["tok"], cache["valid"], offset, self_cond_BCV,
                       config.vocab_size, self_cond_mask_B)
    work = jnp.stack([budget_BC.sum(), jnp.int32(0)]).astype(jnp.int32)
    if refresh_set is not None:  # block expert sets: record when the sets are picked anew
        jax.debug.callback(lambda r: REFRESHES.append(bool(r)), refresh_set)
    return logits, work, expert_set


REFRESHES: list[bool] = []  # refresh_set of each denoise_call with block expert sets


@dataclasses.dataclass
class FakeModel:
    config: FakeDGConfig
    params: dict
    tokenizer: object = None


def install(monkeypatch):
    """Put the fake's contract functions into ``jmoe.sampling.model_call``."""
    from jmoe.sampling import model_call

    monkeypatch.setattr(model_call, "encode_call", encode_call)
    monkeypatch.setattr(model_call, "denoise_call", denoise_call)
    monkeypatch.setattr(model_call, "new_encoder_cache", new_encoder_cache)
