"""Retraining-free robustness methods for MoE models on analog hardware, as post-training transforms.

- ``placement``: heterogeneous analog/digital placement (MaxNNScore and baselines).
- ``romer``: ROMER stage 1 (expert replacement) and stage 2 (percentile router recalibration).

See ``docs/methods.md`` for which steps follow the papers and which are our definitions.
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
from romer_kernels.methods.romer import (
    ReplicaDispatch,
    RomerConfig,
    RomerReport,
    calibration_pass,
    moe_layers,
    recalibrate_router_,
    replace_experts_,
    romer_,
)

__all__ = ["ReplicaDispatch", "RomerConfig", "RomerReport", "calibration_pass", "moe_layers", "recalibrate_router_",
           "replace_experts_", "romer_",
           "SCORES", "digital_fraction", "digital_placement", "expert_scores", "max_nn_scores",
           "router_norm_scores", "routed_experts", "top_experts"]
