"""Test-wide settings. They must be in place before torch/triton import our kernels."""

import os

# Kernels fill the outputs they allocate with NaN first: an element never written cannot pass.
os.environ.setdefault("FASTVIT_KERNELS_POISON", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so CI tests them.
# (Read when a @triton.jit function is defined, so it must be set before any kernel module loads.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
