"""Router capture: every MoE layer's raw router logits and chosen experts, on the host.

Shape letters: B batch, L sequence, N real (non-padding) tokens, E experts, K experts
per token.

The logits and expert ids come back as forward outputs (``capture_router_logits=True``),
so nothing is stored globally and capturing costs one extra device-to-host copy of
``[n_moe_layers, B, L, E]`` float32 and ``[n_moe_layers, B, L, K]`` int32 per batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np


def get_router_logits(model, texts_or_token_batches, layers=None, *,
                      batch_size: int = 8) -> dict[int, np.ndarray]:
    """Raw router logits ``{layer_id: float32 [num_tokens, E]}`` of every MoE layer.

    ``texts_or_token_batches`` is one of: a string or a list of strings (tokenized
    with ``model.tokenizer``'s ``encode``, ``batch_size`` texts per forward); a
    token batch (an int array ``[B, L]`` or ``[L]``, a list of token-id lists of any
    lengths, or a mapping with ``input_ids`` and optionally ``attention_mask``); or
    an iterable of such batches. Padding is removed and tokens are concatenated
    in input order, merged over all batches. ``layers`` picks MoE layer ids (default
    all; a model with dense first layers numbers its MoE layers from there). A model
    without MoE layers gives ``{}`` and a warning. For the experts each token used,
    see ``get_routing``.

    Example:
        logits = jmoe.get_router_logits(model, [tokens_BL, more_tokens_BL], layers=[0, 3])
        logits[0].shape  # (num_real_tokens, num_experts)
    """
    got = _capture(model, texts_or_token_batches, layers, batch_size, None)
    return {i: logits for i, (logits, _) in got.items()}


def get_routing(model, texts_or_token_batches, layers=None, *, batch_size: int = 8,
                experts_per_token=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each MoE layer's router logits and the experts the model actually used.

    ``{layer_id: (logits float32 [num_tokens, E], expert_ids int32 [num_tokens, K])}``:
    the ids come from the family's own router (``jmoe.routing.route``: LLaDA2's
    expert bias and group limit included), ``E`` marking an empty slot (under expert
    choice K = E, slot e holding e when expert e took the token). Inputs, padding,
    merge order and ``layers`` as in ``get_router_logits``; ``experts_per_token`` an
    int routes with that top-k (expert choice: that k's capacity) instead of the
    model's. ``jmoe.analysis.analyze_expert_usage`` takes the result.

    Example:
        routing = jmoe.capture.get_routing(model, tokens_BL)
        logits_NE, ids_NK = routing[model.config.moe_layers[0]]
    """
    if experts_per_token is not None and not _is_int(experts_per_token):
        raise ValueError(f"experts_per_token={experts_per_token!r}: expected None or an int "
                         "(one top-k for every token)")
    return _capture(model, texts_or_token_batches, layers, batch_size, experts_per_token)


def _capture(model, inputs, layers, batch_size: int, experts_per_token):
    """``{layer_id: (logits [N, E], expert_ids [N, K])}`` over all batches, padding removed."""
    from jmoe.model import forward  # late import: jmoe.model imports the model stack

    moe_layers = tuple(getattr(model.config, "moe_layers", ()))
    if not moe_layers:
        warnings.warn(f"model {type(model.config).__name__} has no MoE layers; "
                      "router capture returns {}", stacklevel=3)
        return {}
    if layers is None:
        chosen = moe_layers
    else:
        chosen = tuple(int(i) for i in layers)
        bad = [i for i in chosen if i not in moe_layers]
        if bad:
            raise ValueError(f"layers {bad} are not MoE layers of this model; "
                             f"MoE layers: {list(moe_layers)}")
    # the stacked aux holds MoE layers only: MoE layer id -> its row
    index = [moe_layers.index(i) for i in chosen]
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    logits_parts: dict[int, list[np.ndarray]] = {i: [] for i in chosen}
    ids_parts: dict[int, list[np.ndarray]] = {i: [] for i in chosen}
    for tokens_BL, mask_BL in _batches(model, inputs, batch_size, pad_id):
        if not mask_BL.any():
            continue
        _, aux = forward(model, tokens_BL, attention_mask=mask_BL,
                         experts_per_token=experts_per_token, capture_router_logits=True)
        logits, ids = jax.device_get((aux["router_logits"], aux["expert_ids"]))
        for layer_id, j in zip(chosen, index):  # [n_moe, B, L, E] and [n_moe, B, L, K]
            logits_parts[layer_id].append(np.asarray(logits)[j][mask_BL])
            ids_parts[layer_id].append(np.asarray(ids)[j][mask_BL])
    e = model.config.num_experts
    k = e if getattr(model.config, "routing", None) == "expert_choice" else (
        experts_per_token or model.config.num_experts_per_tok)
    return {i: (np.concatenate(logits_parts[i]) if logits_parts[i]
                else np.zeros((0, e), np.float32),
                np.concatenate(ids_parts[i]) if ids_parts[i] else np.zeros((0, k), np.int32))
            for i in chosen}


def _batches(model, inputs, batch_size: int, pad_id: int):
    """Yield ``(tokens_BL int32, mask_BL bool)`` host batches from any accepted input."""
    if isinstance(inputs, str):
        inputs = [inputs]
    one = _as_batch(inputs, pad_id)
    if one is not None:
        yield one
        return
    if isinstance(inputs, Sequence) and inputs and all(isinstance(x, str) for x in inputs):
        yield from _text_batches(model, list(inputs), batch_size, pad_id)
        return
    if not isinstance(inputs, Iterable):
        raise ValueError(f"texts_or_token_batches of type {type(inputs).__name__}: expected "
                         "texts, a token batch, or an iterable of batches")
    for item in inputs:
        if isinstance(item, str):
            yield from _text_batches(model, [item], batch_size, pad_id)
            continue
        if isinstance(item, Sequence) and item and all(isinstance(x, str) for x in item):
            yield from _text_batches(model, list(item), batch_size, pad_id)
            continue
        batch = _as_batch(item, pad_id)
        if batch is None:
            raise ValueError(f"batch of type {type(item).__name__}: expected an int array "
                             "[B, L] or [L], token-id lists, a mapping with input_ids, or texts")
        yield batch


def _text_batches(model, texts, batch_size, pad_id):
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "encode"):
        raise ValueError("texts need a model with a tokenizer (model.tokenizer.encode); "
                         "pass token ids instead")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    for s in range(0, len(texts), batch_size):
        yield _pad([list(tok.encode(t)) for t in texts[s:s + batch_size]], pad_id)


def _as_batch(item, pad_id):
    """One batch from an array, a mapping or token-id lists; None if ``item`` is not one."""
    if isinstance(item, Mapping):
        ids = np.asarray(item["input_ids"])
        mask = item.get("attention_mask")
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).reshape(ids.shape)
        return _checked(ids, mask.astype(bool))
    if isinstance(item, (np.ndarray, jax.Array)):
        ids = np.asarray(item)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            return None
        return _checked(ids, np.ones(ids.shape, bool))
    if isinstance(item, Sequence) and item and not isinstance(item, str):
        if all(_is_int(x) for x in item):
            return _pad([list(item)], pad_id)
        if all(_is_row(x) for x in item):
            return _pad([list(np.asarray(x).reshape(-1)) for x in item], pad_id)
    return None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_row(x) -> bool:
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.ndim(x) == 1
    return isinstance(x, Sequence) and not isinstance(x, str) and all(_is_int(v) for v in x)


def _pad(rows, pad_id):
    """Right-pad token-id rows to a multiple of 8 (fewer recompiles); padding is masked."""
    longest = max((len(r) for r in rows), default=0)
    length = max(8, -(-longest // 8) * 8)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = True
    return _checked(ids, mask)


def _checked(ids, mask):
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int32), mask
