"""The sampler's static options and its ``lax.while_loop`` carry.

Shape letters: B batch, L internal sequence (bucketed prompt + generated), G
generated positions, S the most model calls a run can make (the trace length).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from jmoe.sampling.budgets import AdaptiveExperts


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """Everything that fixes the compiled loop (a jit static argument).

    Float knobs (temperature, cfg_scale, threshold) are traced arguments instead,
    so changing their values does not recompile; only whether they are on does.
    """

    gen_length: int
    block_length: int
    steps: int
    remasking: str
    sampled: bool        # temperature > 0
    guided: bool         # cfg_scale > 0
    thresholded: bool    # threshold is not None
    threshold_floor: str
    adaptive: AdaptiveExperts | None
    mask_id: int
    eos_id: int | None
    logits_eos_inf: bool
    confidence_eos_eot_inf: bool
    early_stop: bool
    return_trace: bool
    # "llada": prompt-relative blocks, ``steps`` over the whole generation.
    # "llada2": rows laid out from position 0, the generated region starts at the first
    # aligned block holding some row's prompt tail (prompt positions stay fixed),
    # ``steps`` per block, threshold strictly greater, a block ends when ``steps`` are
    # spent or no row has a mask left in it.
    convention: str = "llada"
    cached: bool = False  # llada2: K/V of finished blocks cached, block-sized model calls

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        if self.convention == "llada2":
            return self.steps
        return self.steps // self.num_blocks

    @property
    def max_calls(self) -> int:
        """Fixed steps make exactly ``steps`` calls; threshold decoding commits at
        least one token per call, so at most ``gen_length``."""
        if self.convention == "llada2":
            return self.num_blocks * self.steps
        if self.thresholded:
            return max(self.gen_length, self.steps) if self.threshold_floor == "one" else self.steps
        return self.steps


@struct.dataclass
class SamplerState:
    tokens_BL: jax.Array     # int32, mask id where still masked
    budget_BL: jax.Array     # int32 experts per token of the next model call
    remask_BG: jax.Array     # int32 update rounds each generated position stayed masked
    active_B: jax.Array      # bool: not early-stopped
    block: jax.Array         # int32 current block
    step: jax.Array          # int32 step within the block
    nfe: jax.Array           # int32 model calls so far
    work_S: jax.Array        # int32 routed token-expert pairs of each model call
    trace: dict | None = None  # with return_trace: committed_SBG, budget_SBG, remask_SBG, block_S
    cache: dict | None = None  # cached llada2: {"k", "v"} [layers, B, L, N, K] K/V buffers
    #                            (2B rows with guidance: the prompt-masked copies second)
