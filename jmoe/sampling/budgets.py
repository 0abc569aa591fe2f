"""Adaptive expert budgets: per-position ``experts_per_token`` that grow while masked.

Shape letters: B batch, L sequence, G generated positions. A *budget* is the number
of experts a position is routed to; a *remask* is an update round a position spent
still masked. SEEDS.md §1: prompt positions get ``maximum``, positions to generate
``initial``; every ``update_interval`` model calls each still-masked position of the
current block gets ``remask_count += 1`` and budget ``growth(initial, remask_count)``
clipped to ``maximum``; committed positions keep theirs.

Defaults come from the model and the sampler (``AdaptiveExperts.resolved``):
``maximum`` = the model's top-k (a budget above what the model was trained with only
costs work), ``initial`` = ``max(1, maximum // 2)``, and ``update_interval`` so that
a position still masked reaches ``maximum`` by the middle of its block:
``max(1, steps_per_block // (2 * rounds))``, ``rounds`` the growth rounds from
``initial`` to ``maximum`` (linear ``maximum - initial``, exponential
``ceil(log2(maximum / initial))``).

Block expert sets (``experts_per_block``, ``expert_set``): each model call's routing
is restricted, per MoE layer and sequence, to at most M experts
(``jmoe.routing.block_expert_set``); ``"mass"`` picks them anew at every call,
``"first_step"`` at a block's first call and keeps them for the block (the sampler
carries them in its state), ``"topk_mass"`` anew at every call from the tokens' own
top-k votes.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jmoe.routing import EXPERT_SETS, check_set_coverage

GROWTHS = ("linear", "exponential")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveExperts:
    """Adaptive per-token expert budgets (and block expert sets) for ``jmoe.generate``.

    Fields (None: derived from the model and the sampler when generating, see
    ``resolved``):
        growth: ``"linear"`` (default; ``initial + r``) or ``"exponential"``
            (``initial * 2**r``), r the position's remask count.
        initial: the budget of a position to generate, >= 1 (default
            ``max(1, maximum // 2)``).
        maximum: the prompt's budget and the cap, ``initial..E`` (default: the
            model's top-k, ``num_experts_per_tok``).
        update_interval: model calls between growths, >= 1 (default
            ``max(1, steps_per_block // (2 * rounds))``: a position still masked
            reaches ``maximum`` by the middle of its block).
        experts_per_block: None (default: off) or M in ``maximum..E``: each model
            call's routing uses at most M distinct experts per MoE layer and sequence
            (``jmoe.routing.block_expert_set``), so a memory-bound step reads at most
            M experts' weights per layer instead of up to E. Token choice only.
        expert_set: the set rule, ``"mass"`` (default: every call, the M experts with
            the largest router score summed over the call's tokens),
            ``"first_step"`` (picked by mass at a block's first call, kept for the
            block; after TEAM's observation that routing changes little across
            denoising steps) or ``"topk_mass"`` (every call, the M experts with the
            largest score summed over the tokens that rank them in their own top-k).
            On the shipped model the three are within a point of each other at
            M >= 3E/8 (benchmarks/RESULTS.md).
        set_coverage: a float in ``(0, 1]`` (default 1.0: exactly M): a set keeps
            only as many of its M experts, largest first, as cover this share of the
            sequence's summed router score, and at least the top-k (top-p over
            experts). A call whose tokens agree then reads fewer than M experts. On the
            shipped model 0.9 with M=6 and the prefix cache reads 53% fewer expert bytes
            at -0.5 point (benchmarks/RESULTS.md). Below 1 it needs
            ``experts_per_block``.

    Raises ValueError (one line, naming the value and the range) on a bad field
    here, and on ``maximum`` or ``experts_per_block`` outside the model's range when
    generating.

    Example:
        out = jmoe.generate(model, "Hi", adaptive=jmoe.AdaptiveExperts(
            growth="exponential", experts_per_block=16, expert_set="first_step"))
    """

    growth: str = "linear"
    initial: int | None = None
    maximum: int | None = None
    update_interval: int | None = None
    experts_per_block: int | None = None
    expert_set: str = "mass"
    set_coverage: float = 1.0

    def __post_init__(self):
        if self.growth not in GROWTHS:
            raise ValueError(f"AdaptiveExperts growth={self.growth!r}: expected one of {GROWTHS}")
        if self.initial is not None and (not _is_int(self.initial) or self.initial < 1):
            raise ValueError(f"AdaptiveExperts initial={self.initial!r}: expected an int >= 1")
        if self.maximum is not None and (not _is_int(self.maximum) or
                                         self.maximum < (self.initial or 1)):
            raise ValueError(f"AdaptiveExperts maximum={self.maximum!r}: expected an int >= "
                             f"initial={self.initial or 1}")
        if self.update_interval is not None and (not _is_int(self.update_interval) or
                                                 self.update_interval < 1):
            raise ValueError(f"AdaptiveExperts update_interval={self.update_interval!r}: "
                             "expected an int >= 1")
        if self.expert_set not in EXPERT_SETS:
            raise ValueError(f"AdaptiveExperts expert_set={self.expert_set!r}: expected one "
                             f"of {EXPERT_SETS}")
        try:  # a refinement of block expert sets: below 1 it needs experts_per_block
            cov = check_set_coverage(self.set_coverage, self.experts_per_block)
        except ValueError as e:
            raise ValueError(f"AdaptiveExperts {e}") from None
        object.__setattr__(self, "set_coverage", cov)
        if self.experts_per_block is not None and (
                not _is_int(self.experts_per_block) or
                self.experts_per_block < max(self.maximum or 1, self.initial or 1)):
            raise ValueError(f"AdaptiveExperts experts_per_block={self.experts_per_block!r}: "
                             f"expected an int >= maximum={self.maximum or 'top-k'}")

    def resolved(self, top_k: int, steps_per_block: int) -> "AdaptiveExperts":
        """Every None field filled: ``maximum`` = ``top_k`` (capped below by
        ``initial``), ``initial`` = ``max(1, maximum // 2)``, ``update_interval`` =
        ``max(1, steps_per_block // (2 * rounds))`` (see the module docstring)."""
        maximum = self.maximum if self.maximum is not None else max(top_k, self.initial or 1)
        initial = self.initial if self.initial is not None else max(1, maximum // 2)
        interval = self.update_interval
        if interval is None:
            if self.growth == "linear":
                rounds = maximum - initial
            else:
                rounds = math.ceil(math.log2(maximum / initial))
            interval = max(1, steps_per_block // max(2 * rounds, 1))
        return dataclasses.replace(self, initial=initial, maximum=maximum,
                                   update_interval=interval)

    def check_model(self, config) -> None:
        """``maximum <= E``; ``experts_per_block`` in ``maximum..E`` under token choice."""
        e = config.num_experts
        if self.maximum is not None and self.maximum > e:
            raise ValueError(f"AdaptiveExperts maximum={self.maximum} is outside the allowed "
                             f"budgets 1..num_experts={e}")
        if self.experts_per_block is not None:
            from jmoe.routing import check_expert_set

            check_expert_set(config, self.experts_per_block, self.expert_set,
                             bound=self.maximum or config.num_experts_per_tok)


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
