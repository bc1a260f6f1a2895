"""MoE model integration: conversion of Hugging Face models, placement, routing analysis."""
from romer_kernels.moe.convert import CATEGORIES, Placement, PlacementRow, analogize_, categorize, placement_report

__all__ = ["CATEGORIES", "Placement", "PlacementRow", "analogize_", "categorize", "placement_report"]
