"""HF <-> jmoe checkpoint conversion (``python -m checkpoints_convert``, ``jmoe convert``)."""

from checkpoints_convert.convert import hf_to_jmoe, jmoe_to_hf, read_params

__all__ = ["hf_to_jmoe", "jmoe_to_hf", "read_params"]
