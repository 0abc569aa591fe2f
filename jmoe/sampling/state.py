"""The sampler's static options and its ``lax.while_loop`` carry.

Shape letters: B batch, L the canvas (prompt region + generated region), G generated
positions (the loop's region), S the most model calls a run can make (the trace
length), N kv heads, K head dim. Terms: *block* ``block_length`` generated positions
decoded together; *step* one model call; *remask* a masked position a step leaves
masked; *budget* a position's number of experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct

from jmoe.sampling.budgets import AdaptiveExperts
from jmoe.sampling.conventions import Convention


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """Everything that fixes the compiled loop (a jit static argument), built once by
    ``options.resolve_options`` from the resolved option values.

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
    mask_id: int | None  # None: no mask token (diffusion_gemma's uniform-noise canvas)
    eos_id: int | None
    logits_eos_inf: bool
    confidence_eos_eot_inf: bool
    early_stop: bool
    return_trace: bool
    convention: Convention  # the layout, length, commit and stop rules (conventions.py)
    cached: bool = False  # block-causal conventions: K/V of finished blocks cached,
    #                       block-sized model calls
    approx_cache: str | None = None  # bidirectional models: "prefix" or "dual" (Fast-dLLM)
    cache_refresh: int | None = None  # approximate caches: refresh every n steps of a block
    cache_window: tuple[int, int] = (0, 0)  # approximate caches: (before, after) positions
    #                                         recomputed around the block each step
    decoder: Any = None   # decoders.Decoder (None: fixed schedule, or threshold if thresholded)
    top_k: int | None = None  # sampling keeps the top_k tokens (temperature > 0)
    top_p: bool = False   # nucleus filter on (its value is the traced knob "top_p")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.convention.steps_per_block(self)

    @property
    def max_calls(self) -> int:
        """The most model calls a run can make (the trace's length)."""
        from jmoe.sampling import decoders  # decoders -> remasking; no cycle at call time

        return decoders.of(self).max_calls(self)


@struct.dataclass
class SamplerState:
    tokens_BL: jax.Array     # int32, mask id where still masked
    budget_BL: jax.Array     # int32 experts per token of the next model call
    remask_BG: jax.Array     # int32 update rounds each generated position stayed masked
    active_B: jax.Array      # bool: not early-stopped
    block: jax.Array         # int32 current block
    step: jax.Array          # int32 step within the block
    nfe: jax.Array           # int32 model calls so far
    work_S: jax.Array        # int32 [S, 2]: each model call's routed token-expert pairs and
    #                          expert reads (distinct experts with rows, per layer and row)
    # int32 [B, num_blocks]: model calls each row took part in (had a position to
    # decode), per block (diffusion_gemma: denoising steps per canvas)
    block_calls_BN: jax.Array | None = None
    trace: dict | None = None  # with return_trace: committed_SBG, budget_SBG, remask_SBG, block_S
    decoder: Any = None  # the decoder's own carry (decoders.Decoder.init_carry)
    # block expert sets under expert_set="first_step": bool [n_moe, rows, E], the sets
    # picked at the current block's first call (rows: 2B with guidance)
    expert_set: Any = None
    cache: Any = None  # cached runs: ``model_call.new_cache``'s K/V buffers over the canvas
    #                    (2B rows with guidance: the prompt-masked copies second)
