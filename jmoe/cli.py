"""The ``jmoe`` command line.

``jmoe generate`` (default: the shipped model), ``jmoe routing`` (router statistics),
``jmoe train``, ``jmoe bench``, ``jmoe convert``, ``jmoe forward``. Bad options and
bad inputs end in a one-line ``error: ...`` and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _load(path):
    import jmoe

    return jmoe.load(path)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise FileNotFoundError(f"cannot read --prompts-file {args.prompts_file!r}: "
                                    f"{e.strerror}") from None
    if not prompts:
        raise ValueError("no prompt: give one or more prompts, or --prompts-file FILE")
    return prompts


def _chats(args) -> list[list[dict]]:
    """``--chat`` messages as one-turn conversations (after ``--system``, if given)."""
    if args.prompt or args.prompts_file:
        raise ValueError("give prompts or --chat messages, not both")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [system + [{"role": "user", "content": c}] for c in args.chat]


def _adaptive(args):
    if args.adaptive is None:
        return None
    import jmoe

    return jmoe.AdaptiveExperts(growth=args.adaptive, initial=args.adaptive_initial,
                                maximum=args.adaptive_maximum,
                                update_interval=args.update_interval,
                                experts_per_block=args.experts_per_block,
                                expert_set=args.expert_set, set_coverage=args.set_coverage)


def _show_steps(out, model, animate: bool, delay: float = 0.08) -> None:
    """Each row's denoising step by step: committed tokens appear, ``_`` still masked.

    ``animate`` (stdout a terminal): each frame redraws the last in place. Otherwise
    (a file, a pipe) plain lines, one frame after another, with no escape codes.
    """
    import numpy as np

    committed = np.asarray(out.trace["committed"])  # [nfe, B, G]
    gen = np.asarray(out.tokens)[:, -committed.shape[-1]:]
    done = np.zeros(committed.shape[1:], bool)
    tok = model.tokenizer
    rows = committed.shape[1]
    clear = "\x1b[K" if animate else ""
    for s in range(committed.shape[0]):
        done |= committed[s]
        if s and animate:
            sys.stdout.write(f"\x1b[{rows + 1}F")  # back to the first line of the frame
        sys.stdout.write(f"step {s + 1}/{committed.shape[0]}{clear}\n")
        for b in range(rows):
            cells = [tok.decode([t]) if tok and d else ("_" if not d else str(t))
                     for t, d in zip(gen[b], done[b])]
            sys.stdout.write(("" if tok else " ").join(c or "." for c in cells) + clear + "\n")
        sys.stdout.flush()
        if animate:
            time.sleep(delay)


def _id_prompts(prompts: list[str]) -> list[list[int]]:
    """Prompts of a model without a tokenizer: space-separated token ids."""
    rows = []
    for p in prompts:
        try:
            rows.append([int(t) for t in p.split()])
        except ValueError:
            raise ValueError(f"prompt {p!r} is not token ids: a model without a tokenizer "
                             f"takes space-separated ints, e.g. '5 17 42'") from None
    return rows


def _generate(args) -> int:
    import numpy as np

    import jmoe

    model = _load(args.model)
    if args.system and not args.chat:
        raise ValueError("--system needs --chat (a system message opens a conversation)")
    prompts = _chats(args) if args.chat else _prompts(args)
    kw = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
              temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
              threshold=args.threshold, threshold_floor=args.threshold_floor,
              adaptive=_adaptive(args), mask_id=args.mask_id, eos_id=args.eos_id,
              logits_eos_inf=args.logits_eos_inf,
              confidence_eos_eot_inf=args.confidence_eos_eot_inf,
              early_stop=not args.no_early_stop, seed=args.seed,
              convention=args.convention, cache=args.cache,
              cache_refresh=args.cache_refresh,
              cache_window=tuple(args.cache_window) if args.cache_window else None,
              return_trace=args.show_steps, decoder=args.decoder,
              low_threshold=args.low_threshold, edit_threshold=args.edit_threshold,
              max_post_steps=args.max_post_steps, credit_alpha=args.credit_alpha,
              credit_boost=args.credit_boost, credit_decay=args.credit_decay,
              top_k=args.top_k, top_p=args.top_p, canvas_length=args.canvas_length,
              max_denoising_steps=args.max_denoising_steps, entropy_bound=args.entropy_bound,
              t_min=args.t_min, t_max=args.t_max, stability_threshold=args.stability_threshold,
              confidence_threshold=args.confidence_threshold)
    if model.tokenizer is None and not args.chat:
        prompts = _id_prompts(prompts)
    out = jmoe.generate(model, prompts, **kw)
    if args.show_steps and not args.json:
        _show_steps(out, model, animate=sys.stdout.isatty())
    texts = out.texts
    if texts is None:  # no tokenizer: the generated ids (cut at EOS, as texts are)
        from jmoe.sampling.canvas import cut_eos

        eos = args.eos_id if args.eos_id is not None else model.config.eos_token_id
        g = out.tokens.shape[1] - max(len(p) for p in prompts)
        texts = [" ".join(map(str, cut_eos(r[-g:], eos))) for r in np.asarray(out.tokens).tolist()]
    if args.json:
        print(json.dumps({"prompts": prompts,
                          "texts": texts, "nfe": int(out.nfe),
                          "expert_work": int(out.expert_work),
                          "block_steps": np.asarray(out.block_steps).tolist(),
                          "tokens": np.asarray(out.tokens).tolist()}))
    elif args.chat:  # the replies
        for t in texts:
            print(t)
    elif model.tokenizer is not None:
        for p, t in zip(prompts, texts):
            print(f"{p}{t}")
    else:  # ids: prompt and generation apart
        for p, t in zip(prompts, texts):
            print(f"{' '.join(map(str, p))} -> {t}")
    return 0


def _routing(args) -> int:
    import jmoe

    model = _load(args.model)
    top_k = model.config.num_experts_per_tok if args.top_k is None else args.top_k
    if top_k > model.config.num_experts:
        raise ValueError(f"--top-k {top_k}: expected an int in 1..num_experts="
                         f"{model.config.num_experts}")
    # the experts each layer really chose (LLaDA2: bias and group limit included)
    routing = jmoe.get_routing(model, [args.text], experts_per_token=top_k)
    if not routing:
        print("the model has no MoE layers")
        return 0
    stats = jmoe.analysis.analyze_expert_usage(routing, router=model.config.router)
    print(f"{'layer':>5} {'tokens':>7} {'experts':>7} {'used':>5} {'max/mean':>9} {'cv':>6} "
          f"{'entropy':>8} {'usage H / log E':>16}")
    for layer, s in stats.items():
        used = int((s["counts"] > 0).sum())
        print(f"{layer:>5} {s['num_tokens']:>7} {s['num_experts']:>7} {used:>5} "
              f"{s['max_over_mean']:>9.2f} {s['cv']:>6.2f} {s['entropy']:>8.3f} "
              f"{s['usage_entropy']:>7.3f} / {s['max_entropy']:.3f}")
    return 0


def _train(args) -> int:
    from jmoe.train import run_from_file

    run_from_file(args.config, out=args.out, steps=args.steps, stop_at=args.stop_at)
    print(f"wrote {args.out or 'the config out folder'}")
    return 0


def _bench(args) -> int:
    import numpy as np

    import jmoe

    model = _load(args.model)
    base = ["123+456=", "7+8=", "999+1=", "40+2="]
    prompts = [base[i % len(base)] for i in range(args.batch)]  # exactly --batch rows
    rows = []
    for name, adaptive in (("fixed top-k", None),
                           ("adaptive linear", jmoe.AdaptiveExperts(
                               initial=1, maximum=model.config.num_experts_per_tok,
                               update_interval=1))):
        jmoe.generate(model, prompts, adaptive=adaptive)  # compile
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = jmoe.generate(model, prompts, adaptive=adaptive)
        dt = (time.perf_counter() - t0) / args.repeats
        prompt_len = max(len(model.tokenizer.encode(p)) for p in prompts)
        gen = np.asarray(out.tokens).shape[1] - prompt_len
        rows.append((name, dt, out.nfe, out.expert_work, len(prompts) * gen / dt))
    print(f"{'':18}{'ms/call':>9}{'nfe':>5}{'expert_work':>13}{'tokens/s':>13}")
    for name, dt, nfe, work, tps in rows:
        print(f"{name:18}{dt * 1e3:9.1f}{nfe:5d}{work:13d}{tps:13.0f}")
    print(f"expert_work adaptive / fixed: {rows[1][3] / rows[0][3]:.2f}")
    return 0


def _convert(args) -> int:
    from jmoe.convert import run

    return run(args)


def _plan(args) -> int:
    from jmoe.aot import run

    return run(args)


def _forward(args) -> int:
    import numpy as np

    import jmoe

    model = _load(args.model)
    if model.tokenizer is not None:
        tokens = np.asarray([model.tokenizer.encode(args.text)])
    else:
        tokens = np.asarray([[b % model.config.vocab_size for b in args.text.encode()]])
    logits, aux = jmoe.forward(model, tokens, capture_router_logits=True)
    print(f"tokens {tokens.shape} -> logits {tuple(logits.shape)} ({logits.dtype}), "
          f"backend {aux['moe_backend']}")
    for layer, c in enumerate(np.asarray(aux["expert_counts"])):
        print(f"layer {layer}: expert token counts {c.tolist()}")
    return 0


def _eval(args) -> int:
    from jmoe.eval.run import run_from_args

    try:
        return run_from_args(args)
    except ImportError as e:  # lm_eval missing: one line, as any other bad setup
        raise ValueError(str(e)) from None


def _int_at_least(least: int, what: str):
    """argparse type: an int >= ``least`` (a bad value is the parser's one-line error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"expected {what} (>= {least}), got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive int")
_non_negative_int = _int_at_least(0, "an int")


def _shipped_generation() -> str:
    """The shipped model's generation config, for the help texts ('' if unreadable)."""
    from jmoe.checkpoint import DEFAULT_MODEL_DIR

    try:
        with open(os.path.join(DEFAULT_MODEL_DIR, "config.json")) as f:
            gen = json.load(f).get("generation") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return ", ".join(f"{k} {v}" for k, v in gen.items())


def _add_sampler_options(g) -> None:
    g.add_argument("prompt", nargs="*", help="prompt text(s) (token ids, space separated, "
                   "for a model without tokenizer)")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    g.add_argument("--model", help="jmoe checkpoint or HF folder (default: the shipped model)")
    # unset options (None) are filled once by jmoe.generate: the model's generation
    # config, else the library's default (which the help texts state)
    g.add_argument("--gen-length", type=_positive_int,
                   help="tokens to generate (default: the model's generation config, else 128)")
    g.add_argument("--block-length", type=_positive_int, help="block size (default: the "
                   "model's generation config, else its attention block length, else 32; "
                   "when unset it is fitted to --gen-length: llada takes it if it divides "
                   "gen-length, else gen-length (one block); llada2 library: "
                   "min(32, gen-length))")
    g.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's "
                   "generation config, fitted to --gen-length/--block-length when these are "
                   "given, else llada: gen-length over the whole generation; llada2: "
                   "block-length per block; llada2 caps any value at gen-length)")
    g.add_argument("--temperature", type=float, help="Gumbel temperature, a finite number "
                   ">= 0, 0 = argmax (default: the model's generation config, else 0)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale, a finite "
                   "number >= 0, 0 = off (default: the model's generation config, else 0)")
    g.add_argument("--remasking", choices=("low_confidence", "random"),
                   help="which masked positions a step commits (default: the model's "
                   "generation config, else low_confidence)")
    g.add_argument("--threshold", type=float, help="confidence-threshold parallel decoding, "
                   "in (0, 1] (default: the model's generation config, else off)")
    g.add_argument("--threshold-floor", choices=("one", "schedule"),
                   help="least commits per step in threshold mode (default: the convention's, "
                   "llada: one, llada2: schedule)")
    g.add_argument("--decoder", choices=("fixed", "threshold", "credit", "hierarchy", "joint"),
                   help="which positions a step writes: fixed schedule, threshold (Fast-dLLM/"
                   "dInfer), credit or hierarchy (dInfer), joint (LLaDA2.1's mask-to-token + "
                   "token-to-token edits) (default: the model's generation config, else "
                   "threshold if --threshold is set, else fixed)")
    g.add_argument("--low-threshold", type=float, help="hierarchy: a run's most confident "
                   "commits above this, in [0, 1] (default: 0.4)")
    g.add_argument("--edit-threshold", type=float, help="joint: a written token is replaced "
                   "when another's confidence passes this, in [0, 1] (default: 0.5; S mode "
                   "--threshold 0.5 --edit-threshold 0, Q mode 0.7 / 0.5)")
    g.add_argument("--max-post-steps", type=int, help="joint: edit-only steps after a "
                   "block's last mask, an int >= 0 (default: 16)")
    g.add_argument("--credit-alpha", type=float, help="credit: weight of log(1 + credit) "
                   "added to the logits, >= 0 (default: 0.7)")
    g.add_argument("--credit-boost", type=float, help="credit: power of the top-1 "
                   "probability added each step, >= 0 (default: 0.2)")
    g.add_argument("--credit-decay", type=float, help="credit: decay per step, in [0, 1] "
                   "(default: 0.8)")
    g.add_argument("--top-k", type=int, help="sampling keeps the k most probable tokens, a "
                   "positive int (default: the model's generation config, else all)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1] (default: "
                   "the model's generation config, else off)")
    g.add_argument("--convention", choices=("llada", "llada2", "diffusion_gemma"),
                   help="block convention (default: diffusion_gemma for a DiffusionGemma "
                   "model (its only one), llada2 for a block-causal or LLaDA2 model, else "
                   "llada)")
    # DiffusionGemma's entropy-bound canvas sampler (refused under the other conventions)
    g.add_argument("--canvas-length", type=_positive_int, help="diffusion_gemma: positions "
                   "denoised together (default: the model's generation config, else its "
                   "config's canvas_length, else 256)")
    g.add_argument("--max-denoising-steps", type=_positive_int, help="diffusion_gemma: most "
                   "steps per canvas (default: the model's generation config, else 48)")
    g.add_argument("--entropy-bound", type=float, help="diffusion_gemma: a step accepts the "
                   "lowest-entropy positions whose running entropy stays within this, > 0 "
                   "(default: the model's generation config, else 0.1)")
    g.add_argument("--t-min", type=float, help="diffusion_gemma: the last step's end of the "
                   "linear temperature schedule, >= 0 (default: the model's, else 0.4)")
    g.add_argument("--t-max", type=float, help="diffusion_gemma: the first step's "
                   "temperature, > t-min (default: the model's, else 0.8)")
    g.add_argument("--stability-threshold", type=_non_negative_int, help="diffusion_gemma: a "
                   "row stops once its argmax canvas is unchanged for this many steps and "
                   "confident (default: the model's, else 1)")
    g.add_argument("--confidence-threshold", type=float, help="diffusion_gemma: ... and its "
                   "mean entropy is below this, > 0 (default: the model's, else 0.005)")
    g.add_argument("--cache", nargs="?", const="exact", default=None,
                   choices=("exact", "prefix", "dual"),
                   help="K/V cache: exact (block-causal models, llada2; what a bare --cache "
                   "means), prefix or dual (Fast-dLLM's approximate caches for bidirectional "
                   "models; dual is dInfer's default) (default: exact for llada2 except "
                   "under expert-choice routing, else off)")
    g.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                   help="run every step uncached")
    g.add_argument("--cache-refresh", type=_positive_int, default=None,
                   help="with prefix/dual: recompute the whole cache every N steps of a block "
                   "(default: only at a block's first step)")
    g.add_argument("--cache-window", type=_non_negative_int, nargs=2, default=None,
                   metavar=("BEFORE", "AFTER"),
                   help="with prefix/dual: also recompute the K/V of BEFORE positions before "
                   "the block and AFTER after it each step (dInfer's vicinity refresh; "
                   "default: 0 0)")
    g.add_argument("--adaptive", choices=("linear", "exponential"),
                   help="adaptive per-token expert budgets with this growth (default: off, "
                   "the model's top-k everywhere)")
    g.add_argument("--adaptive-initial", type=_positive_int,
                   help="initial budget with --adaptive (default: half the maximum, >= 1)")
    g.add_argument("--adaptive-maximum", type=_positive_int,
                   help="maximum budget with --adaptive, at most the model's experts "
                   "(default: the model's top-k)")
    g.add_argument("--update-interval", type=_positive_int,
                   help="model calls between growths with --adaptive (default: from the "
                   "steps per block, so a masked position reaches the maximum by mid-block)")
    g.add_argument("--experts-per-block", type=_positive_int,
                   help="block expert sets with --adaptive: at most this many distinct "
                   "experts per layer and sequence in each model call (default: off)")
    g.add_argument("--expert-set", choices=("mass", "first_step", "topk_mass"), default="mass",
                   help="the block set rule with --experts-per-block (default: %(default)s)")
    g.add_argument("--set-coverage", type=float, default=1.0,
                   help="with --experts-per-block: keep only as many of the set's experts as "
                   "cover this share of the summed router score, at least the top-k; in (0, 1] "
                   "(default: %(default)s, exactly M)")
    g.add_argument("--mask-id", type=int, help="mask token id (default: the model's "
                   "mask_token_id)")
    g.add_argument("--eos-id", type=int, help="EOS token id (default: the model's "
                   "eos_token_id)")
    g.add_argument("--logits-eos-inf", action="store_true", help="forbid EOS (default: off)")
    g.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="never commit EOS early (default: off)")
    g.add_argument("--no-early-stop", action="store_true",
                   help="generate every block (default: a row stops after a block with EOS)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed, an int in [0, 2**64) (default: %(default)s)")
    g.add_argument("--show-steps", action="store_true", help="show the denoising step by "
                   "step: redrawn in place on a terminal, plain lines into a file or pipe "
                   "(default: off)")
    g.add_argument("--json", action="store_true", help="print one JSON object (default: off)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jmoe", description="JAX/Flax MoE diffusion language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    shipped = _shipped_generation()
    g = sub.add_parser("generate", help="masked-diffusion generation",
                       epilog=shipped and f"The shipped model's generation config: {shipped}.")
    _add_sampler_options(g)
    g.add_argument("--chat", action="append", default=None, metavar="MESSAGE",
                   help="a user message, rendered with the tokenizer's chat template "
                        "(repeat for a batch of one-turn chats; the model needs a template)")
    g.add_argument("--system", default=None,
                   help="a system message opening each --chat conversation")
    g.set_defaults(func=_generate)
    r = sub.add_parser("routing", help="router statistics per layer for a text")
    r.add_argument("text")
    r.add_argument("--model", help="jmoe checkpoint or HF folder (default: the shipped model)")
    r.add_argument("--top-k", type=_positive_int, help="k for the usage counts, 1..experts "
                   "(default: the model's num_experts_per_tok)")
    r.set_defaults(func=_routing)
    t = sub.add_parser("train", help="train a model from a JSON spec")
    t.add_argument("--config", required=True, help="JSON with model, train, task, out")
    t.add_argument("--out", help="output folder (default: the spec's out)")
    t.add_argument("--steps", type=_positive_int, help="training steps (default: the spec's)")
    t.add_argument("--stop-at", type=_positive_int,
                   help="stop after this step of the schedule (saved there; running the same "
                        "spec again resumes it) (default: run all steps)")
    t.set_defaults(func=_train)
    b = sub.add_parser("bench", help="time generation, fixed vs adaptive budgets")
    b.add_argument("--model", help="jmoe checkpoint (default: the shipped model)")
    b.add_argument("--batch", type=_positive_int, default=8,
                   help="prompts per call (default: %(default)s)")
    b.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed calls per setting (default: %(default)s)")
    b.set_defaults(func=_bench)
    f = sub.add_parser("forward", help="one forward pass; prints shapes and expert usage")
    f.add_argument("text", nargs="?", default="123+456=",
                   help="input text (default: %(default)s)")
    f.add_argument("--model", help="jmoe checkpoint or HF folder (default: the shipped model)")
    f.set_defaults(func=_forward)
    from jmoe.convert import add_arguments

    c = add_arguments(sub.add_parser("convert", help="convert HF checkpoints to jmoe and back"))
    c.set_defaults(func=_convert)
    from jmoe.aot import add_arguments as plan_arguments

    pl = plan_arguments(sub.add_parser(
        "plan", help="compile for a TPU/GPU slice without one and size each program",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    pl.set_defaults(func=_plan)
    from jmoe.eval.run import add_arguments as eval_arguments

    ev = eval_arguments(sub.add_parser(
        "eval", help="evaluate with lm-evaluation-harness (the 'eval' extra) and print "
                     "its table"))
    ev.set_defaults(func=_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
