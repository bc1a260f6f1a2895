"""Measurements of analog models: layer error and speed (more in later modules)."""
from romer_kernels.evaluation.layer_error import LayerErrorRow, layer_error_table, relative_error

__all__ = ["LayerErrorRow", "layer_error_table", "relative_error"]
