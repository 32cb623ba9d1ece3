"""How every backend allocates its outputs: uninitialised, or NaN-filled under
FASTVIT_KERNELS_POISON=1 (the tests set it), so an element a kernel forgets to write cannot pass
for a right answer left over in recycled memory."""

import os

import torch
from torch import Tensor

POISON_ENV_VAR = "FASTVIT_KERNELS_POISON"


def new_output(shape, like: Tensor, dtype=None) -> Tensor:
    """An uninitialised contiguous output on like's device, in like's dtype unless given."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if os.environ.get(POISON_ENV_VAR) == "1":
        out.fill_(float("nan"))
    return out


def empty_bhnd(batch: int, heads: int, tokens: int, width: int, like: Tensor, dtype=None) -> Tensor:
    """A [B, H, N, D] output whose memory is [B, N, H, D], so the caller's reshape to
    [B, N, H·D] is free."""
    return new_output((batch, tokens, heads, width), like, dtype).transpose(1, 2)
