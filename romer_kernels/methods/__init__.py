"""Retraining-free robustness methods for MoE models on analog hardware, as post-training transforms.

- ``placement``: heterogeneous analog/digital placement (MaxNNScore and baselines).
- ``romer``: ROMER stage 1 (expert replacement) and stage 2 (percentile router recalibration).
- ``replicate_quantize``: Replicate-and-Quantize (low-precision replicas of heavy hitters on their own
  tiles, least important experts quantized, memory budget kept).
- ``undo``: ``undo_methods_`` removes what the methods set (none writes the model's weights).

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
from romer_kernels.methods.replicate_quantize import (
    RQConfig,
    RQReport,
    ablation_importance,
    crossbar_lis,
    quantize_symmetric,
    replicate_quantize_,
    wanda_importance,
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
from romer_kernels.methods.undo import undo_methods_

__all__ = ["undo_methods_", "RQConfig", "RQReport", "ablation_importance", "crossbar_lis", "quantize_symmetric",
           "replicate_quantize_", "wanda_importance",
           "ReplicaDispatch", "RomerConfig", "RomerReport", "calibration_pass", "moe_layers", "recalibrate_router_",
           "replace_experts_", "romer_",
           "SCORES", "digital_fraction", "digital_placement", "expert_scores", "max_nn_scores",
           "router_norm_scores", "routed_experts", "top_experts"]
