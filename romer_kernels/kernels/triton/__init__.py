"""Triton (GPU) backend of the analog tiled MVM and of the grouped top-k MoE expert dispatch.

Same semantics as :mod:`romer_kernels.kernels.reference` (tested against it under the Triton interpreter,
``TRITON_INTERPRET=1``). Importing this package needs ``triton``.
"""
from romer_kernels.kernels.triton._kernel import Blocks, bm_rounds
from romer_kernels.kernels.triton.moe import align_block_size, analog_experts_arguments, moe_experts_triton
from romer_kernels.kernels.triton.mvm import analog_linear_triton, stream_seed_table
from romer_kernels.kernels.triton.program import analog_linear_programmed_triton

__all__ = ["Blocks", "align_block_size", "analog_experts_arguments", "analog_linear_programmed_triton", "analog_linear_triton",
           "bm_rounds",
           "moe_experts_triton", "stream_seed_table"]
