"""Router statistics: expert usage, load balance, routing entropy.

Input is a capture ``{layer_id: value}``: either ``(logits [N, E], expert_ids [N, K])``
from ``jmoe.capture.get_routing``, the experts the model actually used (any family,
any routing), or raw router logits ``[N, E]`` alone (``jmoe.get_router_logits``),
whose usage is recomputed by OLMoE's rule (softmax top-k) and so is refused for
other routers. Numpy, jax or torch arrays work. All statistics are computed on the
host in float64.

Routing entropy is of the family's own score distribution: OLMoE
(``softmax_topk``) the router softmax; LLaDA2 (``sigmoid_group_topk``) the sigmoid
scores normalised to sum to one, ``sigmoid(x_e) / sum_j sigmoid(x_j)`` (the scores
its top-k weights are renormalised from, without the selection-only expert bias).
Both lie in ``[0, log E]``.

Shape letters: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _host(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().float().numpy()
    return np.asarray(a)


# DiffusionGemma's router scores by softmax too (its per_expert_scale only weights outputs)
ROUTER_SCORES = ("softmax_topk", "sigmoid_group_topk", "gemma_softmax_topk")


def _layer_logits(layer, logits) -> np.ndarray:
    x = _host(logits).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"router logits of layer {layer} have shape {x.shape}: "
                         "expected [num_tokens, num_experts]")
    return x


def _layer_ids(layer, ids, n: int, e: int) -> np.ndarray:
    ids = _host(ids)
    if ids.ndim != 2 or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert ids of layer {layer} have shape {ids.shape} and dtype "
                         f"{ids.dtype}: expected ints [num_tokens={n}, K]")
    if ids.size and (ids.min() < 0 or ids.max() > e):
        raise ValueError(f"expert ids of layer {layer} span {ids.min()}..{ids.max()}: expected "
                         f"0..{e} ({e} marks an empty slot)")
    return ids.astype(np.int64)


def _softmax(x_NE):
    z = np.exp(x_NE - x_NE.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _normalised_sigmoid(x_NE):
    s = 0.5 * (1.0 + np.tanh(0.5 * x_NE))  # sigmoid without overflow
    return s / s.sum(-1, keepdims=True)


def _entropy(p, axis=-1):
    """Shannon entropy in nats, with 0 * log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -t.sum(axis)


def _softmax_topk_ids(layer, x, top_k):
    e = x.shape[1]
    if not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= e):
        raise ValueError(f"top_k={top_k!r}: expected an int in 1..num_experts={e} "
                         f"(layer {layer})")
    # the top-k of the logits is the top-k of the softmax; ties to the lower id
    return np.argsort(-x, axis=-1, kind="stable")[:, :top_k]


def analyze_expert_usage(routing: Mapping, top_k: int | None = None, *,
                         router: str = "softmax_topk") -> dict[int, dict]:
    """Per-layer expert usage, load balance and routing entropy.

    ``routing``: ``{layer: (logits [N, E], expert_ids [N, K])}`` (``jmoe.capture.get_routing``:
    the experts the model used, ``E`` an empty slot; ``top_k`` must then be None), or
    ``{layer: logits [N, E]}`` with ``top_k``: usage by OLMoE's rule, the top-k of the
    softmax (ties to the lower expert id), only for ``router="softmax_topk"``.
    ``router``: the family's ``config.router``, whose scores the entropy is of
    (module docstring).

    For each layer: ``counts`` ``[E]`` (tokens routed to the expert), ``fraction``
    (counts / all assignments), ``max_over_mean`` (largest load over mean load; 1.0 is
    perfect balance), ``cv`` (coefficient of variation of the loads, std/mean,
    population std), ``entropy`` (mean per-token routing entropy, nats),
    ``usage_entropy`` (entropy of ``fraction``, nats; log E is perfect balance),
    ``max_entropy`` (log E), ``num_tokens`` and ``num_experts``. Layers with no
    tokens get zero counts and NaN figures.

    Example:
        routing = jmoe.capture.get_routing(model, batch)
        stats = jmoe.analysis.analyze_expert_usage(routing, router=model.config.router)
        stats[model.config.moe_layers[0]]["max_over_mean"]
    """
    if router not in ROUTER_SCORES:
        raise ValueError(f"router={router!r}: expected one of {ROUTER_SCORES}")
    scores = _normalised_sigmoid if router == "sigmoid_group_topk" else _softmax
    out = {}
    for layer, value in routing.items():
        if isinstance(value, tuple):
            x = _layer_logits(layer, value[0])
            n, e = x.shape
            if top_k is not None:
                raise ValueError(f"top_k={top_k!r} with expert ids (layer {layer}): the ids "
                                 "are the routing used; capture with experts_per_token=k")
            ids = _layer_ids(layer, value[1], n, e)
        else:
            x = _layer_logits(layer, value)
            n, e = x.shape
            if router != "softmax_topk":
                raise ValueError(f"raw router logits of layer {layer} with router={router!r}: "
                                 "only softmax_topk usage follows from logits alone; pass "
                                 "(logits, expert_ids) from jmoe.capture.get_routing")
            ids = _softmax_topk_ids(layer, x, top_k)
        out[layer] = _layer_stats(x, ids, scores)
    return out


def _layer_stats(x_NE, ids_NK, scores) -> dict:
    n, e = x_NE.shape
    live = ids_NK[ids_NK < e]
    counts = np.bincount(live, minlength=e).astype(np.int64)
    mean, total = counts.mean(), counts.sum()
    nan = float("nan")
    frac = counts / total if total else np.zeros(e)
    return {
        "num_tokens": n,
        "num_experts": e,
        "counts": counts,
        "fraction": frac,
        "max_over_mean": float(counts.max() / mean) if total else nan,
        "cv": float(counts.std() / mean) if total else nan,
        "entropy": float(_entropy(scores(x_NE)).mean()) if n else nan,
        "usage_entropy": float(_entropy(frac)) if total else nan,
        "max_entropy": float(np.log(e)),
    }


def _device(a) -> str:
    if hasattr(a, "devices") and callable(a.devices):  # a jax array
        return sorted(d.platform for d in a.devices())[0]
    if hasattr(a, "device") and hasattr(a, "detach"):  # a torch tensor
        return str(a.device)
    return "cpu"  # numpy: host memory


def print_router_summary(routing: Mapping, top_k: int | None = None, *,
                         router: str = "softmax_topk") -> str:
    """Print one line per layer, e.g. ``Layer 0: 8 tokens x 8 experts, float32, cpu``.

    ``routing`` as in ``analyze_expert_usage``. Each line adds the load balance
    (max/mean, cv) and the mean routing entropy when the routing is known: given
    expert ids (``jmoe.capture.get_routing``), or raw logits with ``top_k`` (OLMoE's
    rule). Returns the printed text.

    Example:
        jmoe.analysis.print_router_summary(jmoe.get_router_logits(model, batch))
    """
    with_ids = any(isinstance(v, tuple) for v in routing.values())
    known = with_ids or top_k is not None
    stats = analyze_expert_usage(routing, top_k, router=router) if known else {}
    lines = []
    for layer, value in routing.items():
        logits = value[0] if isinstance(value, tuple) else value
        shape = tuple(logits.shape)
        if len(shape) != 2:
            raise ValueError(f"router logits of layer {layer} have shape {shape}: "
                             "expected [num_tokens, num_experts]")
        dtype = str(logits.dtype).removeprefix("torch.")
        line = f"Layer {layer}: {shape[0]} tokens x {shape[1]} experts, {dtype}, {_device(logits)}"
        if layer in stats:
            s = stats[layer]
            rule = "routed" if with_ids else f"top-{top_k}"
            line += (f", {rule} load max/mean {s['max_over_mean']:.3f}, cv {s['cv']:.3f}, "
                     f"entropy {s['entropy']:.3f} nats")
        lines.append(line)
    text = "\n".join(lines)
    if lines:
        print(text)
    return text
