"""``python -m jmoe.eval ARGS``: lm_eval's command line (``lm_eval ARGS``) with model
``jmoe`` registered, e.g. ``python -m jmoe.eval run --model jmoe --tasks gsm8k``."""

from jmoe.eval.run import lm_eval_cli

if __name__ == "__main__":
    lm_eval_cli()
