"""MoE model integration: conversion of Hugging Face models, placement, routing analysis."""
from romer_kernels.moe.convert import (
    CATEGORIES,
    Placement,
    PlacementRow,
    UnsupportedWeights,
    analogize_,
    categorize,
    placement_report,
    restore_digital_,
)
from romer_kernels.moe.check import ConversionCheck, check_conversion
from romer_kernels.moe.persist import load_analog, save_analog
from romer_kernels.moe.structure import MoeBlock, moe_blocks
from romer_kernels.moe.routing import (
    LayerRouting,
    RoutingSummary,
    RoutingTrace,
    coefficient_of_variation,
    expert_counts,
    flip_rate,
    frequency_kl,
    load_imbalance_score,
    max_over_mean,
    routing_entropy,
    summarize,
    top_k_overlap,
    trace_routing,
)

__all__ = [
    "CATEGORIES", "ConversionCheck", "LayerRouting", "MoeBlock", "Placement", "PlacementRow", "RoutingSummary",
    "RoutingTrace", "UnsupportedWeights", "analogize_", "check_conversion", "moe_blocks",
    "categorize", "coefficient_of_variation", "load_analog", "save_analog", "expert_counts", "flip_rate", "frequency_kl", "load_imbalance_score",
    "max_over_mean", "placement_report", "restore_digital_", "routing_entropy", "summarize", "top_k_overlap", "trace_routing",
]
