"""DiffusionGemma generation: ``jmoe.generate`` against transformers' ``generate`` on the
same random weights and settings (CPU).

A random ``DiffusionGemmaForBlockDiffusion`` of a few layers at d=256 (every weight
drawn, norms near 1) is saved with ``save_pretrained`` into a temp folder and loaded
by ``jmoe.load`` (the DiffusionGemma model branch's conversion). Both sides generate
the same batch of random prompts with the same canvas length, canvases, denoising
steps, entropy bound, temperature schedule and stopping thresholds, with EOS off so
every canvas is generated (a random model never gets confident, so both run
``max_denoising_steps`` per canvas and do the same work). Measured in one run:
tokens/s of each (generated tokens over the median wall time of ``--repeats`` runs
after a warm-up run, which for jmoe holds the compile), steps per canvas (jmoe:
``GenerateOutput.block_steps``; transformers: generated tokens over its
``tokens_per_forward``, per canvas), and the ratio. Then what jmoe's beyond-the-
reference options save on the same model: adaptive budgets (growing with each
position's renoise count) and block expert sets per canvas, as routed token-expert
pairs (``expert_work``) and expert reads against the plain run, with the share of
tokens equal to the plain run's.

Run (after the model branch is merged):
    python benchmarks/diffusion_gemma.py --layers 4 --canvas-length 64 --canvases 2
The transformers side runs with its default experts implementation (``grouped_mm``);
``--hf-experts eager`` picks the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np


def build_hf(folder: str, args):
    """Save a random DiffusionGemma into ``folder``; return the torch model."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                sliding_window=args.sliding_window, num_experts=args.experts,
                top_k_experts=args.top_k, moe_intermediate_size=args.hidden // 2,
                enable_moe_block=True, max_position_embeddings=4096, eos_token_id=1,
                pad_token_id=0)
    cfg = DiffusionGemmaConfig(text_config=text, canvas_length=args.canvas_length)
    torch.manual_seed(args.seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scalar" in name or "scale" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    if args.hf_experts:
        model.config.text_config.experts_implementation = args.hf_experts
    model.save_pretrained(folder)
    return model


def settings(args) -> dict:
    return dict(max_denoising_steps=args.steps, entropy_bound=args.entropy_bound,
                t_min=args.t_min, t_max=args.t_max, stability_threshold=args.stability_threshold,
                confidence_threshold=args.confidence_threshold)


def timed(fn, repeats: int):
    fn()  # warm-up (jmoe: the compile)
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run_hf(model, prompts, args):
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig)

    s = settings(args)
    bound = s.pop("entropy_bound")
    ids = torch.tensor(prompts)
    g = args.canvas_length * args.canvases

    def go():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=g, eos_token_id=None, pad_token_id=None,
                                  sampler_config=EntropyBoundSamplerConfig(entropy_bound=bound),
                                  disable_compile=True, **s)

    t, out = timed(go, args.repeats)
    # tokens_per_forward = generated tokens / the row's decoder passes
    passes = g / out.tokens_per_forward.double().numpy()
    return {"seconds": t, "tokens_per_s": len(prompts) * g / t,
            "steps_per_canvas": float(np.mean(passes) / args.canvases)}


def run_jmoe(model, prompts, args, **extra):
    import jmoe

    g = args.canvas_length * args.canvases
    go = lambda: jmoe.generate(model, prompts, gen_length=g, canvas_length=args.canvas_length,
                               early_stop=False, seed=args.seed, **settings(args), **extra)
    t, out = timed(go, args.repeats)
    steps = np.asarray(out.block_steps)
    return {"seconds": t, "tokens_per_s": len(prompts) * g / t,
            "steps_per_canvas": float(steps[steps > 0].mean()), "nfe": int(out.nfe),
            "expert_work": int(out.expert_work), "expert_reads": int(out.expert_reads),
            "tokens": np.asarray(out.tokens)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--sliding-window", type=int, default=64)
    p.add_argument("--canvas-length", type=int, default=64)
    p.add_argument("--canvases", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="max_denoising_steps")
    p.add_argument("--entropy-bound", type=float, default=0.1)
    p.add_argument("--t-min", type=float, default=0.4)
    p.add_argument("--t-max", type=float, default=0.8)
    p.add_argument("--stability-threshold", type=int, default=1)
    p.add_argument("--confidence-threshold", type=float, default=0.005)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-experts", default=None, help="transformers' experts_implementation "
                   "(default: its own)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jmoe

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, args.vocab, size=(args.batch, args.prompt_length)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        hf_model = build_hf(folder, args)
        model = jmoe.load(folder)
        hf = run_hf(hf_model, prompts, args)
    base = run_jmoe(model, prompts, args)
    k = args.top_k
    variants = {
        "adaptive": dict(adaptive=jmoe.AdaptiveExperts(initial=max(1, k // 2), maximum=k)),
        "adaptive+sets": dict(adaptive=jmoe.AdaptiveExperts(
            initial=max(1, k // 2), maximum=k, experts_per_block=max(k, args.experts // 2),
            expert_set="first_step")),
    }
    saved = {}
    for name, kw in variants.items():
        r = run_jmoe(model, prompts, args, **kw)
        saved[name] = {"expert_work": r["expert_work"] / base["expert_work"],
                       "expert_reads": r["expert_reads"] / max(base["expert_reads"], 1),
                       "same_tokens": float((r["tokens"] == base["tokens"]).mean()),
                       "tokens_per_s": r["tokens_per_s"]}
    result = {"jmoe": {k: v for k, v in base.items() if k != "tokens"}, "transformers": hf,
              "speedup": base["tokens_per_s"] / hf["tokens_per_s"], "savings": saved,
              "settings": vars(args)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{'':14s} {'tokens/s':>10s} {'steps/canvas':>13s} {'seconds':>9s}")
        for name in ("jmoe", "transformers"):
            r = result[name]
            print(f"{name:14s} {r['tokens_per_s']:10.1f} {r['steps_per_canvas']:13.1f} "
                  f"{r['seconds']:9.3f}")
        print(f"speedup jmoe / transformers: {result['speedup']:.2f}x")
        for name, r in saved.items():
            print(f"{name:14s} expert work {r['expert_work']:.2f}x, expert reads "
                  f"{r['expert_reads']:.2f}x of the plain run, {r['same_tokens']:.0%} tokens "
                  f"equal, {r['tokens_per_s']:.1f} tokens/s")
    return result


if __name__ == "__main__":
    main()
