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

from jmoe import platform as platform_lib
from jmoe import routing as routing_lib
from jmoe import sharding
from jmoe import xla_options
from jmoe.kv_cache import KVCache
from jmoe.models.decoder import Decoder
from jmoe.models.diffusion_gemma import DiffusionGemmaStack
from jmoe.moe import resolve_backend


@dataclasses.dataclass(frozen=True)
class Model:
    """What ``jmoe.load`` returns: a frozen config, a params pytree, a tokenizer or None."""

    config: Any
    params: Any
    tokenizer: Any = None

    def replace(self, **kw) -> "Model":
        return dataclasses.replace(self, **kw)


def stack(config):
    """The decoder-stack module of a config: ``Decoder``, or DiffusionGemma's stack (its
    heterogeneous sandwich-norm layers, encoder and canvas decoder;
    ``jmoe.models.diffusion_gemma``)."""
    if config.family == "diffusion_gemma":
        return DiffusionGemmaStack(config)
    return Decoder(config)


def _init_boxed(config, seed: int = 0):
    """Params with their logical axes (``flax.linen.LogicallyPartitioned`` boxes)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    budget = routing_lib.Budget(None, config.num_experts_per_tok)
    return stack(config).init(jax.random.key(seed), tokens, jnp.ones((1, 4), bool),
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
    params = init_params(config, seed)
    return Model(platform_lib.resolve(config, params), params, tokenizer)


def shard_model(model: Model, mesh, **config_overrides) -> Model:
    """The model on ``mesh``: params placed by their logical axes (routed experts on the
    ``expert`` axis, the rest replicated), ``config.mesh`` set, so every MoE layer runs
    expert-parallel (``jmoe.expert_parallel``).

    Args:
        model: a ``jmoe.Model`` (params on one device or already placed).
        mesh: a ``jax.sharding.Mesh`` with axes ``data`` and ``expert``
            (``jmoe.make_mesh``); an ``expert`` axis of size 1 places params but runs
            the MoE layers as on one device.
        **config_overrides: config fields replaced as well, e.g.
            ``ep_capacity_factor=1.25`` (None, the default, sizes the all-to-all
            buffers for the worst case and never drops; a float f > 0 sizes them at
            f x the balanced load and counts overflow in ``aux["ep_dropped"]``).

    Returns:
        A new ``jmoe.Model``: the config with ``mesh`` and the overrides, the params
        ``device_put`` onto their shardings, the same tokenizer.

    Raises:
        ValueError: ``num_experts`` not divisible by the ``expert`` axis size (the
            message lists the sizes that work); an unknown override field (named) or
            a value the config rejects.

    Example:
        model = jmoe.shard_model(jmoe.random_model(cfg), jmoe.make_mesh(expert=8))
    """
    config = platform_lib.resolve(model.config.replace(mesh=mesh, platform=None,
                                                       **config_overrides))
    params = sharding.shard_params(model.params, param_logical_axes(config), mesh,
                                   num_experts=config.num_experts)
    return model.replace(config=config, params=params)


def apply(config, params, tokens_BL, *, valid_BL, budgets: routing_lib.Budget | None = None,
          cache: KVCache | None = None, capture: bool = False):
    """The model-call contract shared by ``forward``, the sampler and training.

    Args:
        config: the model's frozen config (hashable: a jit static argument).
        params: the params pytree (``init_params``, ``jmoe.load``; logical axes as
            ``param_logical_axes`` declares them).
        tokens_BL: int32 ``[B, L]`` token ids in ``[0, V)`` (not checked here).
        valid_BL: bool ``[B, L]``, keyword-only and required: real tokens. Padding is
            never routed; without ``cache`` it is never attended to either and
            positions count from each row's first real token.
        budgets: a ``jmoe.routing.Budget`` (built by ``jmoe.routing.make_budget``), or
            None (default): every token takes the model's top-k.
        cache: a ``jmoe.kv_cache.KVCache`` or None (default). With a cache the L
            tokens sit at absolute positions ``cache.length .. cache.length + L - 1``
            in every row, their keys/values are written there and queries attend over
            the buffers under the cache's mask (``valid_BL`` then gates routing only).
        capture: bool, default False: add the router's logits and choices to aux.

    Returns:
        ``(logits_BLV, aux, cache)``: logits float32 ``[B, L, V]``; aux holds
        ``expert_counts [n_moe, E]``, ``routed_pairs`` (a scalar),
        ``unrouted_tokens [n_moe]``, ``distinct_experts [n_moe, B]``,
        ``expert_set [n_moe, B, E]`` with block expert sets, ``load_balancing_loss``, ``ep_dropped`` when
        expert-parallel, and with ``capture`` ``router_logits [n_moe, B, L, E]``,
        ``expert_ids`` and ``expert_weights`` ``[n_moe, B, L, K]``; the cache with
        ``length + L`` (keep it to commit the call's tokens) or None without one.

    Raises:
        ValueError: a cached call under expert choice (each expert picks among the
            whole sequence, which a call on part of it does not see); per-token
            budgets under expert choice.

    Example:
        logits, aux, cache = jmoe.model.apply(cfg, params, tokens_BL, valid_BL=mask_BL)
    """
    if cache is not None and config.routing == "expert_choice":
        raise ValueError("routing='expert_choice' cannot run a cached call: each expert picks "
                         "among the whole sequence's tokens, which a call on one block does "
                         "not see; generate with cache=False (jmoe.generate(..., cache=False))")
    budgets = budgets or routing_lib.Budget(None, config.num_experts_per_tok)
    logits, layer_aux, cache = stack(config).apply({"params": params}, tokens_BL, valid_BL,
                                                   budgets, cache)
    return logits, _call_aux(layer_aux, capture), cache


def apply_denoiser(config, params, canvas_BC, *, cache: KVCache, offset, budgets=None,
                   self_cond_BCV=None, self_cond_mask_B=None, capture: bool = False):
    """DiffusionGemma's decoder pass: ``(logits_BCV, aux)``.

    The canvas ``canvas_BC`` (int32 token ids at absolute positions ``offset .. offset +
    C - 1``) attends bidirectionally to itself and to the real keys of ``cache`` (the
    encoder's, ``jmoe.models.diffusion_gemma.new_cache``) below ``offset`` (sliding
    layers: the last ``sliding_window - 1``); nothing is written. ``self_cond_BCV``:
    the previous step's processed logits ``[B, C, V]`` or None (a zero
    self-conditioning signal); ``self_cond_mask_B``: bool ``[B]`` or None, rows set False
    get the zero signal. Logits are float32 after the final soft-cap; aux as ``apply``.
    Raises ValueError for a config of another family.
    """
    if config.family != "diffusion_gemma":
        raise ValueError(f"apply_denoiser is DiffusionGemma's decoder pass; got family "
                         f"{config.family!r}")
    budgets = budgets or routing_lib.Budget(None, config.num_experts_per_tok)
    valid = jnp.ones(canvas_BC.shape, bool)
    logits, layer_aux, _ = stack(config).apply(
        {"params": params}, canvas_BC, valid, budgets, cache, mode="decode", offset=offset,
        self_cond_BLV=self_cond_BCV, self_cond_mask_B=self_cond_mask_B)
    return logits, _call_aux(layer_aux, capture)


def _call_aux(layer_aux, capture: bool) -> dict:
    aux = {
        "expert_counts": layer_aux["expert_counts"],
        "routed_pairs": layer_aux["routed_pairs"].sum(),
        "unrouted_tokens": layer_aux["unrouted_tokens"],
        "distinct_experts": layer_aux["distinct_experts"],
        "load_balancing_loss": routing_lib.load_balancing_loss(layer_aux["lb_f"],
                                                               layer_aux["lb_p"]),
    }
    if "expert_set" in layer_aux:  # block expert sets
        aux["expert_set"] = layer_aux["expert_set"]
    if "ep_dropped" in layer_aux:  # expert-parallel capacity mode: assignments dropped
        aux["ep_dropped"] = layer_aux["ep_dropped"].sum()
    if capture:
        for name in ("router_logits", "expert_ids", "expert_weights"):
            aux[name] = layer_aux[name]
    return aux


def _check_tokens(config, tokens_BL):
    """``tokens_BL`` as an integer array ``[B, L]``, B, L >= 1, L within the model's
    positions, ids in ``[0, V)`` (when concrete); else a ValueError naming the bad
    shape, dtype or id and what was expected."""
    if isinstance(tokens_BL, jax.Array):  # concrete or traced
        tokens = tokens_BL
    else:
        try:
            tokens = np.asarray(tokens_BL)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"tokens must be a [batch, length] array of token ids: {e}") \
                from None
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if tokens.dtype.kind not in "iu":  # floats would be truncated, bools are no ids
        raise ValueError(f"tokens have dtype {tokens.dtype}: expected integer token ids")
    b, l = tokens.shape
    if b == 0 or l == 0:
        raise ValueError(f"tokens have shape {(b, l)}: expected [batch, length] with at least "
                         f"one row and one token")
    if l > config.max_position_embeddings:
        raise ValueError(f"tokens length L={l} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    if not isinstance(tokens, jax.core.Tracer):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary "
                             f"[0, {config.vocab_size})")
        check_text_only(config, tokens)
    return tokens


def check_text_only(config, tokens_BL=None, pixel_values=None):
    """Refuse multimodal input in one line: jmoe runs DiffusionGemma's text model only (the
    vision tower is not loaded). ValueError for ``pixel_values`` given, or concrete tokens
    holding the config's ``image_token_id``."""
    image_id = getattr(config, "image_token_id", None)
    if pixel_values is not None:
        raise ValueError("pixel_values given: jmoe runs DiffusionGemma's text model only (the "
                         "vision tower is not loaded); pass token ids without images")
    if image_id is not None and tokens_BL is not None and \
            not isinstance(tokens_BL, jax.core.Tracer) and bool(np.any(np.asarray(tokens_BL)
                                                                        == image_id)):
        raise ValueError(f"tokens hold the image token id {image_id}: jmoe runs "
                         "DiffusionGemma's text model only (no vision tower); pass text tokens")


def _check_mask(attention_mask, shape_BL):
    """``attention_mask`` as a bool ``[B, L]`` array: bool or 0/1 numbers of the tokens'
    shape; None marks every token real."""
    if attention_mask is None:
        return jnp.ones(shape_BL, bool)
    mask = attention_mask if isinstance(attention_mask, jax.Array) else np.asarray(attention_mask)
    if tuple(mask.shape) != tuple(shape_BL):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != tokens shape "
                         f"{tuple(shape_BL)}: expected [B, L] like the tokens")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"attention_mask has dtype {mask.dtype}: expected bool or 0/1")
    if mask.dtype != bool and not isinstance(mask, jax.core.Tracer):
        m = np.asarray(mask)
        bad = m[(m != 0) & (m != 1)]
        if bad.size:
            raise ValueError(f"attention_mask holds {bad.flat[0].item()!r}: expected bool or 0/1 "
                             f"(1 a real token, 0 padding)")
    return jnp.asarray(mask).astype(bool)


@xla_options.jit(static_argnames=("config", "capture"))
def _forward(params, tokens_BL, valid_BL, budget, *, config, capture):
    logits, aux, _ = apply(config, params, tokens_BL, valid_BL=valid_BL, budgets=budget,
                           capture=capture)
    return logits, aux


def forward(model: Model, tokens_BL, *, attention_mask=None, experts_per_token=None,
            max_experts=None, experts_per_block=None, set_coverage=1.0,
            capture_router_logits=False):
    """Logits ``[B, L, V]`` (float32) and an aux dict, from one compiled call.

    Compiled once per config, input shapes, budget form and capture flag (jmoe's jit,
    ``jmoe.xla_options``); later calls of the same kind reuse it.

    Args:
        model: a ``jmoe.Model`` (``jmoe.load``, ``jmoe.random_model``); with
            ``config.mesh`` holding an ``expert`` axis > 1 the MoE layers run
            expert-parallel.
        tokens_BL: int token ids ``[B, L]`` (a NumPy or jax array of an integer dtype,
            or nested lists of ints), each in ``[0, V)``, B >= 1,
            ``1 <= L <= config.max_position_embeddings``.
        attention_mask: ``[B, L]`` bool or 0/1 ints marking real tokens (1) and
            padding (0), or None (default: every token is real). Padding is never
            routed nor attended to, and positions count from each row's first real
            token, so left padding never changes a row's result.
        experts_per_token: None (default: every token takes the model's top-k,
            ``config.num_experts_per_tok``); an int k in ``1..E`` (this call's top-k
            for every token; under expert choice the k of the per-sequence capacity
            ``C = ceil(capacity_factor * L * k / E)``); or an int array ``[B, L]`` (or
            broadcastable to it) of per-token budgets ``1 <= k_i <= max_experts``,
            token choice only. Concrete values are checked; traced ones (under an
            outer jit) are clipped to ``[1, max_experts]``.
        max_experts: None (default) or an int in ``1..E``: K, the static bound on any
            token's experts (the width of the router's top-k and of the captured
            ``expert_ids``). None: the model's top-k, or k for an int k. Given with an
            int k, k becomes a masked budget under bound ``max_experts``; given alone,
            every token takes ``max_experts`` experts (expert choice: the capacity's k).
        experts_per_block: None (default: unrestricted) or an int M in
            ``K..E`` (K: the call's top-k bound): a block expert set per MoE layer and
            sequence, the M experts with the largest router score summed over the
            sequence's real tokens (``jmoe.routing.block_expert_set``, rule
            ``mass``); every token then takes its top-k (its budget) within the set,
            weighted by the model's own rule. Token choice only.
        set_coverage: float in ``(0, 1]``, default 1.0 (the set is exactly M experts):
            with ``experts_per_block``, each set keeps only its largest experts that
            cover this share of its summed router score, at least K (top-p over
            experts; as ``jmoe.AdaptiveExperts.set_coverage`` in generation).
        capture_router_logits: bool, default False: also return the router's logits
            and choices in aux.

    Returns:
        ``(logits_BLV, aux)``: logits float32 ``[B, L, V]`` (before softmax; values
        at padding positions mean nothing) and a dict, n_moe being the MoE layers
        (``num_layers - first_k_dense_replace``):
        ``expert_counts`` int32 ``[n_moe, E]`` (assignments each expert took),
        ``routed_pairs`` int32 scalar (token-expert assignments summed over the MoE
        layers; shared experts not counted), ``unrouted_tokens`` int32 ``[n_moe]``
        (real tokens no expert took; nonzero under expert choice only),
        ``load_balancing_loss`` float32 scalar (the Switch/OLMoE loss over real
        tokens at the model's top-k, before ``router_aux_loss_coef``), ``moe_backend``
        str (the expert backend, ``auto`` resolved), ``ep_dropped`` int32 scalar when
        expert-parallel (assignments dropped by ``ep_capacity_factor`` buffers; 0 when
        it is None); with ``capture_router_logits`` also ``router_logits`` float32
        ``[n_moe, B, L, E]``, ``expert_ids`` int32 and ``expert_weights`` float32
        ``[n_moe, B, L, K]`` (token choice: ranked best first, id == E marking an
        empty slot, beyond a token's budget or on padding; expert choice: K = E, slot
        e holding e when expert e picked the token, else E).

    Raises:
        ValueError: ``tokens_BL`` not 2-D, not of an integer dtype (floats are never
            truncated), empty (B or L = 0: there is nothing to compute, and an empty
            result would hide the mistake) or longer than ``max_position_embeddings``;
            a token id outside ``[0, V)``; ``attention_mask`` of another shape than
            ``tokens_BL`` or holding values other than 0/1; ``max_experts``
            not an int in ``1..E``; ``experts_per_token`` not integers, a value below
            1 or above ``max_experts``, or an int above E; per-token budgets (an
            array, or an int with ``max_experts``) under ``routing="expert_choice"``;
            an array of budgets not a scalar nor broadcastable to ``[B, L]``;
            ``experts_per_block`` not an int in ``K..E`` or given under expert
            choice; ``set_coverage`` not a float in ``(0, 1]``, or below 1 without
            ``experts_per_block``; ``moe_backend="cpu_gmm"`` on a platform other than CPU.
        RuntimeError: ``moe_backend="cpu_gmm"`` set explicitly and jmoe's CPU kernels
            cannot be built here (with the compiler's message).

    Example:
        logits_BLV, aux = jmoe.forward(model, [[5, 17, 42]], experts_per_token=2,
                                       capture_router_logits=True)
    """
    config = platform_lib.resolve(model.config, model.params)  # kernels for its devices
    tokens = _check_tokens(config, tokens_BL)
    valid = _check_mask(attention_mask, tokens.shape)
    budget = routing_lib.make_budget(config, experts_per_token, max_experts,
                                     shape_BL=tuple(tokens.shape),
                                     experts_per_block=experts_per_block,
                                     set_coverage=set_coverage)
    logits, aux = _forward(model.params, jnp.asarray(tokens, jnp.int32), valid, budget,
                           config=config, capture=bool(capture_router_logits))
    aux["moe_backend"] = resolve_backend(config.moe_backend, config.dtype, config.platform)
    return logits, aux
