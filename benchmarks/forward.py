"""jmoe's compiled forward vs transformers' OlmoeForCausalLM on the same random model.

Run: python benchmarks/forward.py [--layers 4 --d 256 --experts 64 --topk 8 --batch 4 --len 256]
Prints one table: time per forward of each side, their ratio, and achieved
GFLOP/s on the routed work against this machine's dense f32 matmul.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def best_time(fn, repeats):
    fn()  # warm-up (compilation for jax)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def routed_flops(a, tokens):
    """FLOPs of the work a dropless MoE model must do: attention projections,
    attention scores, k routed experts per token, router and LM head."""
    d, f, l, k, e, v = a.d, a.d // 2, a.len, a.topk, a.experts, a.vocab
    per_tok_layer = 2 * d * (4 * d) + 2 * 2 * l * d + k * 2 * 3 * d * f + 2 * d * e
    return tokens * (a.layers * per_tok_layer + 2 * d * v)


def dense_matmul_gflops(n=1024):
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t, _ = best_time(lambda: f(x).block_until_ready(), 5)
    return 2 * n ** 3 / t / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()

    import jax
    import torch
    import transformers

    import jmoe

    cfg = transformers.OlmoeConfig(
        vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.d // 2,
        num_hidden_layers=a.layers, num_attention_heads=max(1, a.d // 64),
        num_key_value_heads=max(1, a.d // 64), num_experts=a.experts,
        num_experts_per_tok=a.topk, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    tm = transformers.OlmoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p_ in tm.parameters():
            p_.normal_(0.0, 0.05)
    tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.len))
    with tempfile.TemporaryDirectory() as tmp:
        tm.save_pretrained(tmp)
        model = jmoe.load(tmp)

    tt = torch.as_tensor(tokens)

    def run_torch():
        with torch.no_grad():
            return tm(tt).logits

    def run_jmoe():
        return jmoe.forward(model, tokens)[0].block_until_ready()

    err = np.abs(np.asarray(run_jmoe()) - run_torch().numpy()).max()
    t_torch, med_torch = best_time(run_torch, a.repeats)
    t_jmoe, med_jmoe = best_time(run_jmoe, a.repeats)
    flops = routed_flops(a, a.batch * a.len)
    dense = dense_matmul_gflops()
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"jax {jax.__version__}, moe_backend {model.config.moe_backend}->"
          f"{jmoe.forward(model, tokens[:1, :8])[1]['moe_backend']}")
    print(f"model: d={a.d}, {a.layers} layers, {a.experts} experts top-{a.topk}, "
          f"tokens {a.batch}x{a.len}; max |logit diff| {err:.2e}")
    print(f"{'':24}{'best ms':>10}{'median ms':>11}{'GFLOP/s':>10}{'vs dense mm':>13}")
    for name, t, m in (("transformers (torch)", t_torch, med_torch), ("jmoe (jax.jit)", t_jmoe, med_jmoe)):
        g = flops / t / 1e9
        print(f"{name:24}{t * 1e3:10.1f}{m * 1e3:11.1f}{g:10.1f}{g / dense:12.2f}x")
    print(f"{'dense f32 matmul 1024^3':24}{'':21}{dense:10.1f}")
    print(f"speed-up jmoe vs transformers: {t_torch / t_jmoe:.2f}x (best), {med_torch / med_jmoe:.2f}x (median)")


if __name__ == "__main__":
    main()
