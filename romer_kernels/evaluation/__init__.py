"""Measurements of analog models: layer error and speed here; perplexity and routing (``lm_metrics``), downstream task accuracy with lm-evaluation-harness (``tasks``), the
Monte Carlo (``runner``: trials on one model re-programmed in place; ``executors``: local or Ray;
``sweep`` / ``compare``: the noise sweep and the method comparison), memory (``memory``)."""
from romer_kernels.evaluation.layer_error import LayerErrorRow, layer_error_table, relative_error

__all__ = ["LayerErrorRow", "layer_error_table", "relative_error"]
