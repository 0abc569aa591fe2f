"""The diffusion sampler: jmoe.generate against the PyTorch path, threshold and adaptive.

Run: python benchmarks/sampler.py [--d 256 --layers 4 --experts 64 --topk 8 --batch 4
                                   --prompt 32 --gen 64 --block 32 --repeats 3]

One random OLMoE (``transformers.OlmoeForCausalLM``, weights normal(0, --std), saved
with ``save_pretrained`` and opened with ``jmoe.load(dir, causal=False,
mask_token_id=...)``; the LM head is normal(0, --head-std) so that predictions
are peaked), the same prompts and schedule on both sides. All ratios
come from one run, each timing the best of ``--repeats`` interleaved rounds after
a warm-up call (jmoe's compilation, torch's first call):

1. jmoe.generate vs LLaDA's reference generate loop (SEEDS.md §3, written here in
   PyTorch) over ``OlmoeForCausalLM`` made bidirectional with a 4-D zero additive
   attention mask: tokens/s, and whether the greedy tokens agree.
2. threshold decoding (``threshold=--threshold``, floor 1) vs fixed steps
   (``steps=gen_length``): model calls (NFE) and time.
3. adaptive budgets (``AdaptiveExperts(linear, initial=1, maximum=top-k,
   update_interval=--interval)``) vs fixed top-k: expert work and time.
On random weights (2) and (3) show the mechanics, not the savings of a trained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch
import transformers

import jmoe


def make_hf_model(args, folder: str):
    cfg = transformers.OlmoeConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.f,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, num_experts=args.experts,
        num_experts_per_tok=args.topk, eos_token_id=args.vocab - 2, pad_token_id=args.vocab - 3,
        bos_token_id=None, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                std = args.head_std if name == "lm_head.weight" else args.std
                p.copy_(std * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model


def _schedule(n: int, steps: int) -> list[int]:
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


@torch.no_grad()
def torch_llada_generate(model, prompt, *, gen_length, block_length, steps, mask_id,
                         temperature=0.0):
    """LLaDA's reference loop (SEEDS.md §3) over a bidirectional HF model."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    bidirectional = torch.zeros(b, 1, p + gen_length, p + gen_length)
    blocks = gen_length // block_length
    for blk in range(blocks):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        counts = _schedule(int((x[0, lo:hi] == mask_id).sum()), steps // blocks)
        for n in counts:
            mask_index = x == mask_id
            logits = model(x, attention_mask=bidirectional).logits
            logits[..., mask_id] = -torch.inf  # as jmoe: the mask token is never predicted
            if temperature > 0:
                l64 = logits.to(torch.float64)
                noise = (-torch.log(torch.rand_like(l64))) ** temperature
                x0 = torch.argmax(l64.exp() / noise, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            conf = torch.gather(torch.softmax(logits, -1), -1, x0[..., None])[..., 0]
            conf[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.tensor(-torch.inf))
            for j in range(b):
                _, idx = torch.topk(conf[j], k=n)
                x[j, idx] = x0[j, idx]
    return x


def timed(fns: dict, repeats: int) -> dict:
    """Best wall time of each fn over ``repeats`` interleaved rounds after a warm-up."""
    out = {name: fn() for name, fn in fns.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("vocab", 2048), ("d", 256), ("f", 128), ("layers", 4), ("heads", 8),
                          ("experts", 64), ("topk", 8), ("batch", 4), ("prompt", 32),
                          ("gen", 64), ("block", 32), ("steps", 32), ("repeats", 3),
                          ("interval", 4)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--std", type=float, default=0.05)
    # a larger LM head gives peaked predictions, so confidence thresholds are reached
    ap.add_argument("--head-std", type=float, default=0.5)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    mask_id = args.vocab - 1
    with tempfile.TemporaryDirectory() as folder:
        hf = make_hf_model(args, folder)
        model = jmoe.load(folder, causal=False, mask_token_id=mask_id, tokenizer=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, args.vocab - 3, (args.batch, args.prompt))
    sched = dict(gen_length=args.gen, block_length=args.block)
    gen = lambda **kw: lambda: jmoe.generate(model, prompt, early_stop=False, **sched, **kw)
    adaptive = jmoe.AdaptiveExperts(growth="linear", initial=1, maximum=args.topk,
                                    update_interval=args.interval)
    fns = {
        "torch": lambda: torch_llada_generate(hf, torch.from_numpy(prompt), steps=args.steps,
                                              mask_id=mask_id, **sched),
        "jmoe": gen(steps=args.steps),
        "fixed_steps": gen(steps=args.gen),
        "threshold": gen(steps=args.gen, threshold=args.threshold),
        "adaptive": gen(steps=args.gen, adaptive=adaptive),
    }
    best, out = timed(fns, args.repeats)
    ntok = args.batch * args.gen
    same = (out["torch"].numpy() == out["jmoe"].tokens).mean()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads "
          f"{torch.get_num_threads()}; model d={args.d} layers={args.layers} "
          f"experts={args.experts} top-{args.topk}, vocab {args.vocab}; batch {args.batch} x "
          f"prompt {args.prompt} + gen {args.gen}, block {args.block}")
    print(f"{'comparison':<44}{'baseline':>14}{'jmoe':>14}{'ratio':>9}")
    rows = [
        (f"LLaDA loop, steps={args.steps}: tokens/s (torch | jmoe)",
         ntok / best["torch"], ntok / best["jmoe"]),
        (f"threshold {args.threshold} vs steps={args.gen}: NFE", out["fixed_steps"].nfe,
         out["threshold"].nfe),
        (f"threshold {args.threshold} vs steps={args.gen}: time s", best["fixed_steps"],
         best["threshold"]),
        ("adaptive vs fixed top-k: expert work", out["fixed_steps"].expert_work,
         out["adaptive"].expert_work),
        ("adaptive vs fixed top-k: time s", best["fixed_steps"], best["adaptive"]),
    ]
    for name, base, ours in rows:
        print(f"{name:<44}{base:>14.4g}{ours:>14.4g}{ours / base:>9.3f}")
    print(f"greedy tokens equal to the torch loop: {same:.1%} of positions")


if __name__ == "__main__":
    main()
