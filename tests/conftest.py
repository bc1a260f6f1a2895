import os

import torch

# Without a GPU the Triton tests run in the interpreter on CPU tensors; triton reads this when @triton.jit
# runs, so it must be set before anything imports triton. With a GPU they run compiled, on CUDA tensors.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
