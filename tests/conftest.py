import os

# The Triton tests run in the interpreter on CPU; triton reads this when @triton.jit runs, so it must be
# set before anything imports triton.
os.environ["TRITON_INTERPRET"] = "1"
