"""Router statistics: expert usage, load balance, routing entropy.

Input is the capture format ``{layer_id: [N, E]}`` of raw (unnormalised) router
logits, e.g. from ``jmoe.get_router_logits``; numpy, jax or torch arrays work.
All statistics are computed on the host in float64.

Shape letters: N tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _host(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().float().numpy()
    return np.asarray(a)


def _layer_logits(layer, logits) -> np.ndarray:
    x = _host(logits).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"router logits of layer {layer} have shape {x.shape}: "
                         "expected [num_tokens, num_experts]")
    return x


def _softmax(x_NE):
    z = np.exp(x_NE - x_NE.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _entropy(p, axis=-1):
    """Shannon entropy in nats, with 0 * log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -t.sum(axis)


def analyze_expert_usage(router_logits: Mapping, top_k: int) -> dict[int, dict]:
    """Per-layer expert usage under top-k token choice.

    For each layer: ``counts`` ``[E]`` (tokens whose top-k includes the expert; the
    top-k of the logits equals the top-k of the softmax, ties to the lower expert
    id as in ``jmoe.routing``), ``fraction`` (counts / (N*k)), ``max_over_mean``
    (largest load over mean load; 1.0 is perfect balance), ``cv`` (coefficient of
    variation of the loads, std/mean, population std), ``entropy`` (mean per-token
    entropy of the router softmax, nats), ``usage_entropy`` (entropy of
    ``fraction``, nats; log E is perfect balance), ``max_entropy`` (log E),
    ``num_tokens`` and ``num_experts``. Layers with no tokens get zero counts and
    NaN figures.

    Example:
        stats = jmoe.analysis.analyze_expert_usage(jmoe.get_router_logits(model, batch), 8)
        stats[0]["max_over_mean"]
    """
    out = {}
    for layer, logits in router_logits.items():
        x = _layer_logits(layer, logits)
        n, e = x.shape
        if not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= e):
            raise ValueError(f"top_k={top_k!r}: expected an int in 1..num_experts={e} "
                             f"(layer {layer})")
        top_NK = np.argsort(-x, axis=-1, kind="stable")[:, :top_k]
        counts = np.bincount(top_NK.reshape(-1), minlength=e).astype(np.int64)
        mean = counts.mean()
        nan = float("nan")
        frac = counts / (n * top_k) if n else np.zeros(e)
        out[layer] = {
            "num_tokens": n,
            "num_experts": e,
            "counts": counts,
            "fraction": frac,
            "max_over_mean": float(counts.max() / mean) if n else nan,
            "cv": float(counts.std() / mean) if n else nan,
            "entropy": float(_entropy(_softmax(x)).mean()) if n else nan,
            "usage_entropy": float(_entropy(frac)) if n else nan,
            "max_entropy": float(np.log(e)),
        }
    return out


def _device(a) -> str:
    if hasattr(a, "devices") and callable(a.devices):  # a jax array
        return sorted(d.platform for d in a.devices())[0]
    if hasattr(a, "device") and hasattr(a, "detach"):  # a torch tensor
        return str(a.device)
    return "cpu"  # numpy: host memory


def print_router_summary(router_logits: Mapping, top_k: int | None = None) -> str:
    """Print one line per layer, e.g. ``Layer 0: 8 tokens x 8 experts, float32, cpu``.

    With ``top_k`` each line adds the load balance (max/mean, cv) and the mean
    routing entropy. Returns the printed text.

    Example:
        jmoe.analysis.print_router_summary(jmoe.get_router_logits(model, batch))
    """
    stats = analyze_expert_usage(router_logits, top_k) if top_k is not None else {}
    lines = []
    for layer, logits in router_logits.items():
        shape = tuple(logits.shape)
        if len(shape) != 2:
            raise ValueError(f"router logits of layer {layer} have shape {shape}: "
                             "expected [num_tokens, num_experts]")
        dtype = str(logits.dtype).removeprefix("torch.")
        line = f"Layer {layer}: {shape[0]} tokens x {shape[1]} experts, {dtype}, {_device(logits)}"
        if layer in stats:
            s = stats[layer]
            line += (f", top-{top_k} load max/mean {s['max_over_mean']:.3f}, cv {s['cv']:.3f}, "
                     f"entropy {s['entropy']:.3f} nats")
        lines.append(line)
    text = "\n".join(lines)
    if lines:
        print(text)
    return text
