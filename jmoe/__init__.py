"""jmoe: JAX/Flax Mixture-of-Experts diffusion language models.

The curated public API; everything else is importable from its module.
"""

from jmoe import compile_cache
from jmoe.config import (DIFFUSIONGEMMA_26B_A4B, LLADA2_MINI, LLADA_MOE_7B, OLMOE_1B_7B,
                         DiffusionGemmaConfig, LLaDA2Config, OlmoeConfig)
from jmoe.checkpoint import load
from jmoe.model import Model, forward, init_params, random_model, shard_model
from jmoe.capture import get_router_logits, get_routing
from jmoe import analysis
from jmoe.sampling import AdaptiveExperts, GenerateOutput, generate
from jmoe import aot, sharding
from jmoe.sharding import make_mesh

__all__ = [
    "OlmoeConfig", "OLMOE_1B_7B", "LLADA_MOE_7B", "LLaDA2Config", "LLADA2_MINI",
    "DiffusionGemmaConfig", "DIFFUSIONGEMMA_26B_A4B",
    "Model", "forward", "init_params", "random_model", "shard_model", "load",
    "get_router_logits", "get_routing", "analysis",
    "generate", "GenerateOutput", "AdaptiveExperts",
    "make_mesh", "sharding", "aot", "compile_cache",
]
__version__ = "0.1.0"

compile_cache.enable_by_default()
