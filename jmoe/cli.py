"""The ``jmoe`` command line: ``jmoe forward``, ``jmoe convert`` (more subcommands as they land).

Bad options and bad inputs end in a one-line ``error: ...`` and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _forward(args) -> int:
    import numpy as np

    import jmoe

    if args.model:
        model = jmoe.load(args.model)
    else:
        config = jmoe.OlmoeConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=16, moe_intermediate_size=32,
                                  num_experts=8, num_experts_per_tok=2)
        model = jmoe.random_model(config, seed=args.seed)
        print("no --model given: using a small random OLMoE (2 layers, 8 experts, top-2)")
    if model.tokenizer is not None and args.text is not None:
        tokens = np.asarray([model.tokenizer.encode(args.text)])
    else:
        text = args.text if args.text is not None else "hello, mixture of experts"
        tokens = np.asarray([[b % model.config.vocab_size for b in text.encode()]])
    logits, aux = jmoe.forward(model, tokens, capture_router_logits=True)
    print(f"tokens {tokens.shape} -> logits {tuple(logits.shape)} ({logits.dtype}), "
          f"backend {aux['moe_backend']}")
    print(f"next-token argmax: {int(np.asarray(logits)[0, -1].argmax())}")
    counts = np.asarray(aux["expert_counts"])
    for layer, c in enumerate(counts):
        print(f"layer {layer}: expert token counts {c.tolist()}")
    return 0


def _convert(args) -> int:
    from checkpoints_convert.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jmoe", description="JAX/Flax MoE diffusion language models.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forward", help="one forward pass; prints shapes and expert usage")
    f.add_argument("text", nargs="?", help="input text (bytes as tokens without a tokenizer)")
    f.add_argument("--model", help="jmoe checkpoint or HF folder (default: a small random model)")
    f.add_argument("--seed", type=int, default=0, help="seed of the random model")
    f.set_defaults(func=_forward)
    from checkpoints_convert.cli import add_arguments

    c = add_arguments(sub.add_parser("convert", help="convert HF checkpoints to jmoe and back"))
    c.set_defaults(func=_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
