"""Running lm_eval on a jmoe model: ``evaluate`` (the library call), ``jmoe eval`` (its
arguments and runner) and ``lm_eval_cli`` (lm_eval's own command line with ``jmoe``
registered). lm_eval is imported only when an evaluation runs.
"""

from __future__ import annotations

import json

# jmoe eval option -> model arg: (argparse type, help)
SAMPLER_FLAGS = {
    "gen_length": (int, "tokens generated per prompt (default: the model's generation "
                        "config, else 128)"),
    "block_length": (int, "block size (default: the model's, else 32 fitted to gen_length)"),
    "steps": (int, "denoising steps (default: the model's, else the convention's)"),
    "temperature": (float, "sampling temperature, 0 is greedy (default: the task's "
                           "do_sample/temperature, else the model's, else 0)"),
    "threshold": (float, "confidence-threshold parallel decoding in (0, 1] (default: off)"),
    "decoder": (str, "fixed, threshold, credit, hierarchy or joint (default: fixed, or "
                     "threshold with --threshold)"),
    "remasking": (str, "low_confidence or random (default: low_confidence)"),
    "cache": (str, "exact, prefix, dual, true or false (default: exact for llada2, else "
                   "none)"),
    "cfg_scale": (float, "classifier-free guidance scale >= 0, generation and likelihood "
                         "(default: 0, off)"),
    "experts_per_token": (int, "fixed top-k for every token, generation and likelihood "
                               "(default: the model's top-k)"),
    "adaptive": (str, "adaptive expert budgets: linear or exponential (default: off)"),
    "adaptive_initial": (int, "adaptive: budget of a position to generate (default: "
                              "maximum // 2)"),
    "adaptive_maximum": (int, "adaptive: prompt budget and cap (default: the model's top-k)"),
    "update_interval": (int, "adaptive: model calls between budget growths (default: "
                             "derived from the steps)"),
    "experts_per_block": (int, "block expert sets: at most M distinct experts per layer and "
                               "sequence per call (default: off)"),
    "expert_set": (str, "block expert set rule: mass, first_step or topk_mass (default: "
                        "mass)"),
    "set_coverage": (float, "block expert sets keep only the experts covering this share "
                            "of the set's router score, in (0, 1] (default: 1.0, all M)"),
    "mc_num": (int, "likelihood: Monte Carlo draws per request (default: 128)"),
    "mc_batch_size": (int, "likelihood: draws per stratified batch and model call "
                           "(default: min(32, mc_num))"),
    "seed": (int, "sampler and likelihood seed (default: 0)"),
}


def _lm_module():
    try:
        import jmoe.eval.lm as lm
    except ImportError as e:
        raise ImportError(f"jmoe.eval needs lm-evaluation-harness ({e}): pip install "
                          f"'jmoe[eval]' (lm_eval>=0.4.9,<0.5)") from None
    return lm


def evaluate(tasks, *, model_args: dict | str | None = None, limit=None,
             include_path=None, num_fewshot=None, batch_size=None,
             apply_chat_template: bool = False, gen_kwargs=None, log_samples: bool = False,
             task_manager=None, **simple_evaluate_kw) -> dict:
    """``lm_eval.simple_evaluate`` with ``model="jmoe"``.

    Args:
        tasks: task names (lm_eval's, or in ``include_path``).
        model_args: ``JmoeLM`` args as a dict or ``"k=v,..."`` (``pretrained`` unset:
            the shipped default model).
        limit: int or fraction of each task's documents, or None (all).
        include_path: a folder (or list) of extra task YAMLs, or None.
        task_manager: an ``lm_eval.tasks.TaskManager`` or None (default: lm_eval's, with
            ``include_path``); e.g. ``TaskManager(include_path=..., include_defaults=False)``
            skips indexing lm_eval's own tasks (about 10 s).
        num_fewshot, batch_size, apply_chat_template, gen_kwargs, log_samples: as
            ``lm_eval.simple_evaluate``; ``**simple_evaluate_kw`` passed on too.

    Returns:
        lm_eval's results dict; ``results["config"]["jmoe"]`` holds the model calls,
        NFE and expert work (routed token-expert pairs) the run spent.
    """
    _lm_module()  # registers "jmoe"
    import lm_eval
    from lm_eval.tasks import TaskManager

    if task_manager is not None and include_path:
        raise ValueError(f"include_path={include_path!r} with a task_manager: expected one "
                         f"(give the TaskManager the include_path)")
    tm = task_manager or (TaskManager(include_path=include_path) if include_path else None)
    return lm_eval.simple_evaluate(
        model="jmoe", model_args=model_args or {}, tasks=list(tasks), limit=limit,
        num_fewshot=num_fewshot, batch_size=batch_size, task_manager=tm,
        apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
        log_samples=log_samples, **simple_evaluate_kw)


def lm_eval_cli(argv=None) -> None:
    """lm_eval's command line (``lm_eval ...`` / ``lm-eval run ...``) with ``jmoe``
    registered: lm_eval 0.4.13 finds third-party models only once imported."""
    import sys

    _lm_module()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def add_arguments(p):
    """The ``jmoe eval`` options on an argparse parser."""
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm_eval task names (or ones under --include-path)")
    p.add_argument("--model", default=None,
                   help="jmoe checkpoint or HF folder (default: the shipped model)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task: an int, or a fraction < 1 (default: all)")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    p.add_argument("--batch-size", default=None,
                   help="prompts per jmoe.generate call, or 'auto' (default: 64)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the tokenizer's chat template")
    p.add_argument("--model-args", default="",
                   help="more JmoeLM args as k=v,... (any jmoe.generate option, "
                        "jmoe.load overrides)")
    p.add_argument("--output-path", default=None, help="write lm_eval's results JSON here")
    for name, (typ, text) in SAMPLER_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=text)
    return p


def run_from_args(args) -> int:
    """``jmoe eval``: evaluate, print lm_eval's table and the work spent."""
    _lm_module()
    from lm_eval.utils import make_table, simple_parse_args_string

    model_args = simple_parse_args_string(args.model_args) if args.model_args else {}
    for name in SAMPLER_FLAGS:
        if getattr(args, name) is not None:
            model_args[name] = getattr(args, name)
    if args.model:
        model_args["pretrained"] = args.model
    limit = args.limit
    if limit is not None:
        if limit <= 0 or (limit >= 1 and limit != int(limit)):
            raise ValueError(f"--limit {limit}: expected an int >= 1 or a fraction in (0, 1)")
        limit = int(limit) if limit >= 1 else limit
    results = evaluate([t for t in args.tasks.split(",") if t], model_args=model_args,
                       limit=limit, include_path=args.include_path,
                       num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       apply_chat_template=args.apply_chat_template)
    print(make_table(results))
    info = results["config"]["jmoe"]
    print("jmoe: " + ", ".join(f"{k}={info[k]}" for k in (
        "generate_rows", "generate_nfe", "generate_expert_work", "generate_expert_reads",
        "loglikelihood_rows", "loglikelihood_expert_work", "loglikelihood_expert_reads")))
    if args.output_path:
        with open(args.output_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0
