"""A loaded model (config + params + tokenizer) and the compiled forward pass.

Shape letters: B batch, L sequence, V vocab, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from jmoe import routing as routing_lib
from jmoe import sharding
from jmoe import xla_options
from jmoe.kv_cache import KVCache
from jmoe.models.decoder import Decoder
from jmoe.moe import resolve_backend


@dataclasses.dataclass(frozen=True)
class Model:
    """What ``jmoe.load`` returns: a frozen config, a params pytree, a tokenizer or None."""

    config: Any
    params: Any
    tokenizer: Any = None

    def replace(self, **kw) -> "Model":
        return dataclasses.replace(self, **kw)


def _init_boxed(config, seed: int = 0):
    """Params with their logical axes (``flax.linen.LogicallyPartitioned`` boxes)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    budget = routing_lib.Budget(None, config.num_experts_per_tok)
    return Decoder(config).init(jax.random.key(seed), tokens, jnp.ones((1, 4), bool),
                                budget)["params"]


def init_params(config, seed: int = 0):
    """Random params for a config (normal(0.02) weights, unit norms, zero expert bias).

    Compiled as one program (about half the time of running ``init`` op by op;
    the same values)."""
    return jax.jit(lambda: nn.unbox(_init_boxed(config, seed)))()


def abstract_params(config, as_struct: bool = False):
    """The params tree of a config without allocating it: shapes, or ShapeDtypeStructs."""
    structs = jax.eval_shape(lambda: nn.unbox(_init_boxed(config)))
    if as_struct:
        return structs
    return jax.tree.map(lambda s: tuple(s.shape), structs)


def param_logical_axes(config):
    """The logical axis names of every params leaf, as declared where each param is
    created (a tree of ``PartitionSpec``s of names; ``jmoe.sharding`` maps them)."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _init_boxed(config)))


def random_model(config, seed: int = 0, tokenizer=None) -> Model:
    """A model with random weights, e.g. for tests and benchmarks.

    Example:
        model = jmoe.random_model(jmoe.OLMOE_1B_7B.replace(num_layers=2))
    """
    return Model(config, init_params(config, seed), tokenizer)


def shard_model(model: Model, mesh, **config_overrides) -> Model:
    """The model on ``mesh``: params placed by their logical axes (routed experts on the
    ``expert`` axis, the rest replicated), ``config.mesh`` set, so every MoE layer runs
    expert-parallel; ``config_overrides`` too (e.g. ``ep_capacity_factor=1.25``).

    Raises ValueError when ``num_experts`` does not split over the ``expert`` axis.

    Example:
        model = jmoe.shard_model(jmoe.random_model(cfg), jmoe.make_mesh(expert=8))
    """
    config = model.config.replace(mesh=mesh, **config_overrides)
    params = sharding.shard_params(model.params, param_logical_axes(config), mesh,
                                   num_experts=config.num_experts)
    return model.replace(config=config, params=params)


def apply(config, params, tokens_BL, *, valid_BL, budgets: routing_lib.Budget | None = None,
          cache: KVCache | None = None, capture: bool = False):
    """The model-call contract shared by ``forward``, the sampler and training.

    ``tokens_BL`` int32 ``[B, L]``; ``valid_BL`` bool ``[B, L]`` (real tokens);
    ``budgets`` a ``jmoe.routing.Budget`` (None: the model's top-k); ``cache`` a
    ``jmoe.kv_cache.KVCache`` for a cached call (see ``jmoe.models.decoder.Decoder``).
    Returns ``(logits_BLV float32, aux, cache)``: aux holds ``expert_counts [n_moe, E]``,
    ``routed_pairs`` (a scalar), ``unrouted_tokens [n_moe]``, ``load_balancing_loss``,
    ``ep_dropped`` when expert-parallel, and with ``capture`` ``router_logits
    [n_moe, B, L, E]``, ``expert_ids`` and ``expert_weights`` ``[n_moe, B, L, K]``.
    A cached call under expert choice is a ValueError: each expert picks among the
    whole sequence, which a call on part of it does not see.
    """
    if cache is not None and config.routing == "expert_choice":
        raise ValueError("routing='expert_choice' cannot run a cached call: each expert picks "
                         "among the whole sequence's tokens, which a call on one block does "
                         "not see; generate with cache=False (jmoe.generate(..., cache=False))")
    budgets = budgets or routing_lib.Budget(None, config.num_experts_per_tok)
    logits, layer_aux, cache = Decoder(config).apply({"params": params}, tokens_BL, valid_BL,
                                                     budgets, cache)
    aux = {
        "expert_counts": layer_aux["expert_counts"],
        "routed_pairs": layer_aux["routed_pairs"].sum(),
        "unrouted_tokens": layer_aux["unrouted_tokens"],
        "load_balancing_loss": routing_lib.load_balancing_loss(layer_aux["lb_f"],
                                                               layer_aux["lb_p"]),
    }
    if "ep_dropped" in layer_aux:  # expert-parallel capacity mode: assignments dropped
        aux["ep_dropped"] = layer_aux["ep_dropped"].sum()
    if capture:
        for name in ("router_logits", "expert_ids", "expert_weights"):
            aux[name] = layer_aux[name]
    return logits, aux, cache


@xla_options.jit(static_argnames=("config", "capture"))
def _forward(params, tokens_BL, valid_BL, budget, *, config, capture):
    logits, aux, _ = apply(config, params, tokens_BL, valid_BL=valid_BL, budgets=budget,
                           capture=capture)
    return logits, aux


def forward(model: Model, tokens_BL, *, attention_mask=None, experts_per_token=None,
            max_experts=None, capture_router_logits=False):
    """Logits ``[B, L, V]`` (float32) and an aux dict, from one compiled call.

    ``attention_mask`` ``[B, L]`` marks real tokens (1) and padding (0); positions
    count from each row's first real token. ``experts_per_token`` is an int (the
    model's top-k for this call) or an int array ``[B, L]`` of per-token budgets
    ``1 <= k_i <= max_experts`` (default bound: the model's top-k).
    aux: ``expert_counts [n_moe_layers, E]``, ``routed_pairs``,
    ``load_balancing_loss``, ``moe_backend``, ``unrouted_tokens [n_moe_layers]``
    (tokens no expert picked; expert choice only); with ``capture_router_logits``
    also ``router_logits [n_moe_layers, B, L, E]`` (float32), ``expert_ids`` and
    ``expert_weights`` ``[n_moe_layers, B, L, K]`` (id == E marks an empty slot;
    K = E under expert choice, slot e holding expert e when it picked the token).

    Example:
        logits, aux = jmoe.forward(model, tokens, capture_router_logits=True)
    """
    config = model.config
    tokens = np.asarray(tokens_BL) if not isinstance(tokens_BL, jax.Array) else tokens_BL
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary "
                             f"[0, {config.vocab_size})")
    if attention_mask is None:
        valid = jnp.ones(tokens.shape, bool)
    else:
        valid = jnp.asarray(attention_mask).astype(bool)
        if valid.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {valid.shape} != tokens shape {tokens.shape}")
    budget = routing_lib.make_budget(config, experts_per_token, max_experts)
    logits, aux = _forward(model.params, jnp.asarray(tokens, jnp.int32), valid, budget,
                           config=config, capture=bool(capture_router_logits))
    aux["moe_backend"] = resolve_backend(config.moe_backend, config.dtype)
    return logits, aux
