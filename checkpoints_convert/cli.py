"""Command line of the converter (``python -m checkpoints_convert``): ``jmoe.convert``'s."""

from jmoe.convert import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
