"""jmoe: JAX/Flax Mixture-of-Experts diffusion language models.

The curated public API; everything else is importable from its module.
"""

from jmoe.config import LLADA_MOE_7B, OLMOE_1B_7B, OlmoeConfig
from jmoe.checkpoint import load
from jmoe.model import Model, forward, init_params, random_model

__all__ = [
    "OlmoeConfig", "OLMOE_1B_7B", "LLADA_MOE_7B",
    "Model", "forward", "init_params", "random_model", "load",
]
__version__ = "0.1.0"
