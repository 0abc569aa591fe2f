"""Block and step schedules of the LLaDA sampler.

Shape letters: B batch, G generated positions (``gen_length``). A *block* is a
window of ``block_length`` generated positions decoded before the next one starts
(semi-autoregressive when ``block_length < gen_length``); a *step* is one model
call; the *schedule* says how many masked positions a step commits.

These are small pure functions so that other conventions (LLaDA2's aligned
blocks, a schedule over ``block_length`` with a KV cache) can be added beside them.
"""

from __future__ import annotations

import jax.numpy as jnp


def schedule_count(num_masked, steps: int, step):
    """Tokens to commit at ``step`` (0-based) of ``steps`` when ``num_masked`` are masked.

    LLaDA's even schedule: ``num_masked // steps`` each, the first
    ``num_masked % steps`` steps one more. Steps past the last commit the rest
    (only reachable in threshold mode, where a block may need more steps).
    """
    base, extra = num_masked // steps, num_masked % steps
    count = base + (step < extra).astype(jnp.int32)
    return jnp.where(step < steps, count, num_masked)


def block_window_G(block, block_length: int, gen_length: int):
    """``[G]`` bool: the generated positions of block ``block``."""
    g = jnp.arange(gen_length)
    return (g >= block * block_length) & (g < (block + 1) * block_length)


def before_block_end_G(block, block_length: int, gen_length: int):
    """``[G]`` bool: generated positions up to the end of block ``block``."""
    return jnp.arange(gen_length) < (block + 1) * block_length


def check_lengths(gen_length: int, block_length: int, steps: int) -> tuple[int, int]:
    """Validate the lengths; return ``(num_blocks, steps_per_block)``."""
    for name, v in (("gen_length", gen_length), ("block_length", block_length),
                    ("steps", steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}={v!r}: expected a positive int")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of "
                         f"block_length={block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"steps={steps} is not a multiple of the number of blocks "
                         f"{blocks} (gen_length={gen_length} / block_length={block_length})")
    return blocks, steps // blocks
