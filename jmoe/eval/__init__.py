"""Evaluation the way the field runs it: jmoe as an lm-evaluation-harness model.

``jmoe.eval.JmoeLM`` (registered with lm_eval as model ``jmoe``), ``jmoe.eval.evaluate``
(``lm_eval.simple_evaluate`` on a jmoe model), the ``jmoe eval`` command and
``python -m jmoe.eval`` (lm_eval's own command line with ``jmoe`` registered). The
likelihood estimators (``jmoe.eval.likelihood``) need no lm_eval; the rest needs the
``eval`` extra (lm_eval 0.4.x).

Example:
    results = jmoe.eval.evaluate(["jmoe_addition"], include_path="tests/eval_tasks",
                                 model_args={"threshold": 0.9})
"""

from __future__ import annotations

__all__ = ["JmoeLM", "evaluate"]


def __getattr__(name):  # lm_eval is imported only when asked for
    if name == "JmoeLM":
        from jmoe.eval.run import _lm_module

        return _lm_module().JmoeLM
    if name == "evaluate":
        from jmoe.eval.run import evaluate

        return evaluate
    raise AttributeError(f"module 'jmoe.eval' has no attribute {name!r}")
