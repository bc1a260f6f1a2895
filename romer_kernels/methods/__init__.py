"""Retraining-free robustness methods for MoE models on analog hardware, as post-training transforms.

- ``placement``: heterogeneous analog/digital placement (MaxNNScore and baselines).
"""
from romer_kernels.methods.placement import (
    SCORES,
    digital_fraction,
    digital_placement,
    expert_scores,
    max_nn_scores,
    router_norm_scores,
    routed_experts,
    top_experts,
)

__all__ = ["SCORES", "digital_fraction", "digital_placement", "expert_scores", "max_nn_scores",
           "router_norm_scores", "routed_experts", "top_experts"]
