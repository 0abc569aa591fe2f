"""Evaluation the way the field runs it: jmoe as an lm-evaluation-harness model.

- ``jmoe.eval.lm.JmoeLM``: the lm_eval ``LM``, registered as model ``jmoe`` when
  ``jmoe.eval.lm`` is imported (and declared as an ``lm_eval.models`` entry point).
- ``jmoe.eval.run.evaluate``: ``lm_eval.simple_evaluate`` on a jmoe model;
  ``jmoe eval`` (the command) and ``python -m jmoe.eval`` (lm_eval's own command line
  with ``jmoe`` registered).
- ``jmoe.eval.likelihood``: the likelihood estimators (no lm_eval needed).

Everything but ``likelihood`` needs the ``eval`` extra (lm_eval 0.4.x). This package
imports nothing itself, so ``jmoe.eval.likelihood`` works without lm_eval.

Example:
    from jmoe.eval.run import evaluate
    results = evaluate(["jmoe_addition"], include_path="tests/eval_tasks",
                       model_args={"threshold": 0.9})
"""
