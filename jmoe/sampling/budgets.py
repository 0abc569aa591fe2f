"""Adaptive expert budgets: per-position ``experts_per_token`` that grow while masked.

Shape letters: B batch, L sequence, G generated positions. A *budget* is the number
of experts a position is routed to; a *remask* is an update round a position spent
still masked. SEEDS.md §1: prompt positions get ``maximum``, positions to generate
``initial``; every ``update_interval`` model calls each still-masked position of the
current block gets ``remask_count += 1`` and budget ``growth(initial, remask_count)``
clipped to ``maximum``; committed positions keep theirs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

GROWTHS = ("linear", "exponential")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveExperts:
    """Adaptive per-token expert budgets for ``jmoe.generate``.

    Example:
        out = jmoe.generate(model, "Hi", adaptive=jmoe.AdaptiveExperts(growth="exponential"))
    """

    growth: str = "linear"
    initial: int = 1
    maximum: int = 8
    update_interval: int = 8

    def __post_init__(self):
        if self.growth not in GROWTHS:
            raise ValueError(f"AdaptiveExperts growth={self.growth!r}: expected one of {GROWTHS}")
        if not _is_int(self.initial) or self.initial < 1:
            raise ValueError(f"AdaptiveExperts initial={self.initial!r}: expected an int >= 1")
        if not _is_int(self.maximum) or self.maximum < self.initial:
            raise ValueError(f"AdaptiveExperts maximum={self.maximum!r}: expected an int >= "
                             f"initial={self.initial}")
        if not _is_int(self.update_interval) or self.update_interval < 1:
            raise ValueError(f"AdaptiveExperts update_interval={self.update_interval!r}: "
                             "expected an int >= 1")

    def check_model(self, num_experts: int) -> None:
        if self.maximum > num_experts:
            raise ValueError(f"AdaptiveExperts maximum={self.maximum} is outside the allowed "
                             f"budgets 1..num_experts={num_experts}")


def growth_budget(adaptive: AdaptiveExperts, remask_count):
    """``growth(initial, remask_count)`` clipped to ``maximum`` (int32)."""
    r = remask_count.astype(jnp.float32)
    if adaptive.growth == "linear":
        k = adaptive.initial + r
    else:  # exponential; float so 2**r cannot overflow an int before the clip
        k = adaptive.initial * jnp.exp2(jnp.minimum(r, 62.0))
    return jnp.minimum(k, adaptive.maximum).astype(jnp.int32)


def initial_budgets_BL(adaptive: AdaptiveExperts, prompt_region_BL):
    """``maximum`` on the prompt region, ``initial`` on the positions to generate."""
    return jnp.where(prompt_region_BL, adaptive.maximum, adaptive.initial).astype(jnp.int32)


def update_budgets(adaptive: AdaptiveExperts, nfe, budget_BG, remask_BG, still_masked_BG):
    """After model call number ``nfe`` (1-based): grow the budgets of still-masked positions."""
    due = (nfe % adaptive.update_interval) == 0
    grow = still_masked_BG & due
    remask_BG = remask_BG + grow.astype(jnp.int32)
    budget_BG = jnp.where(grow, growth_budget(adaptive, remask_BG), budget_BG)
    return budget_BG, remask_BG
