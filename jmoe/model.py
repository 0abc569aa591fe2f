"""A loaded model (config + params + tokenizer) and the compiled forward pass.

Shape letters: B batch, L sequence, V vocab, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import routing as routing_lib
from jmoe import xla_options
from jmoe.moe import resolve_backend


@dataclasses.dataclass(frozen=True)
class Model:
    """What ``jmoe.load`` returns: a frozen config, a params pytree, a tokenizer or None."""

    config: Any
    params: Any
    tokenizer: Any = None

    def replace(self, **kw) -> "Model":
        return dataclasses.replace(self, **kw)


def model_module(config):
    """The Flax module of a config's family."""
    if config.family == "olmoe":
        from jmoe.models.olmoe import OlmoeModel

        return OlmoeModel(config)
    if config.family == "llada2":
        from jmoe.models.llada2 import LLaDA2Model

        return LLaDA2Model(config)
    raise ValueError(f"unknown model family {config.family!r}")


def init_params(config, seed: int = 0):
    """Random params for a config (normal(0.02) weights, unit norms).

    Compiled as one program (about half the time of running ``init`` op by op;
    the same values)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(lambda key: model_module(config).init(key, tokens)["params"])
    return init(jax.random.key(seed))


def abstract_params(config, as_struct: bool = False):
    """The params tree of a config without allocating it: shapes, or ShapeDtypeStructs."""
    structs = jax.eval_shape(lambda: init_params(config))
    if as_struct:
        return structs
    return jax.tree.map(lambda s: tuple(s.shape), structs)


def random_model(config, seed: int = 0, tokenizer=None) -> Model:
    """A model with random weights, e.g. for tests and benchmarks.

    Example:
        model = jmoe.random_model(jmoe.OLMOE_1B_7B.replace(num_layers=2))
    """
    return Model(config, init_params(config, seed), tokenizer)


@xla_options.jit(static_argnames=("config", "k_max", "capture"))
def _forward(params, tokens_BL, valid_BL, budget_BL, *, config, k_max, capture):
    logits, layer_aux = model_module(config).apply({"params": params}, tokens_BL, valid_BL,
                                                   budget_BL, k_max)
    aux = {
        "expert_counts": layer_aux["expert_counts"],  # [n_moe_layers, E]
        "routed_pairs": layer_aux["routed_pairs"].sum(),
        "unrouted_tokens": layer_aux["unrouted_tokens"],  # [n_moe_layers]
        "load_balancing_loss": routing_lib.load_balancing_loss(layer_aux["lb_f"],
                                                               layer_aux["lb_p"]),
    }
    if "ep_dropped" in layer_aux:  # expert-parallel capacity mode: assignments dropped
        aux["ep_dropped"] = layer_aux["ep_dropped"].sum()
    if capture:
        for name in ("router_logits", "expert_ids", "expert_weights"):
            aux[name] = layer_aux[name]
    return logits, aux


def _budget_and_bound(config, experts_per_token, max_experts):
    """Resolve ``experts_per_token`` into (budget array or None, static k_max)."""
    top_k, e = config.num_experts_per_tok, config.num_experts
    if max_experts is not None and not 1 <= int(max_experts) <= e:
        raise ValueError(f"max_experts={max_experts} outside 1..num_experts={e}")
    if experts_per_token is None:
        return None, int(max_experts or top_k)
    if isinstance(experts_per_token, (int, np.integer)) and not isinstance(experts_per_token, bool):
        k = int(experts_per_token)
        k_max = int(max_experts or max(k, top_k))
        routing_lib.check_budget(k, k_max, e)
        # a scalar is the model's own top-k for this call: a static k, no masking
        return (None, k) if max_experts is None else (jnp.int32(k), k_max)
    k_max = int(max_experts or top_k)
    routing_lib.check_budget(experts_per_token, k_max, e)
    return jnp.asarray(experts_per_token, jnp.int32), k_max


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
    budget, k_max = _budget_and_bound(config, experts_per_token, max_experts)
    if budget is not None and getattr(config, "routing", "token_choice") == "expert_choice":
        raise ValueError("experts_per_token as per-token budgets (or with max_experts) needs "
                         "routing='token_choice'; with routing='expert_choice' pass a scalar k "
                         "(it sets the capacity C = ceil(capacity_factor * L * k / E))")
    logits, aux = _forward(model.params, jnp.asarray(tokens, jnp.int32), valid, budget,
                           config=config, k_max=k_max, capture=bool(capture_router_logits))
    aux["moe_backend"] = resolve_backend(config.moe_backend, config.dtype)
    return logits, aux
