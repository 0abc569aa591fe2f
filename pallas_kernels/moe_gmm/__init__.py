"""Grouped-matmul MoE experts: gate/up with SiLU fused, then down, dropped rows never computed.

``api.moe_experts(x_TD, routing, w_gate_EDF, w_up_EDF, w_down_EFD) -> y_TD`` is the
entry point (``jmoe.moe.expert_compute("pallas", ...)`` calls it).
"""

from pallas_kernels.moe_gmm.api import moe_experts
from pallas_kernels.moe_gmm.kernel import BlockSizes
from pallas_kernels.moe_gmm.layout import GroupLayout, make_layout

__all__ = ["moe_experts", "BlockSizes", "GroupLayout", "make_layout"]
