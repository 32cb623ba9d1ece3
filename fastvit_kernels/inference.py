"""The recommended inference path: `optimize_for_inference(model, dtype=..., compile=...)`.

    model = fastvit_kernels.optimize_for_inference(timm.create_model("levit_256"), dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(images.to(torch.bfloat16))

What it does, in order (each step is also a public function, see docs/serving.md):
  1. eval mode;
  2. patch_timm(model, fold_bn=True): the fused attention modules, LeViT's BatchNorms folded into
     their Linear / Conv2d layers and the stem's convolution + Hardswish fused;
  3. the dtype (bfloat16 runs the Linear layers on AMX through oneDNN, and the attention kernels'
     bf16 paths);
  4. with compile=True, torch.compile with Inductor's freezing (weights become constants, so
     oneDNN gets pre-packed weights) — recommended for steady serving; compile=False keeps the
     eager model (no compile time, no recompiles for new shapes).
The model is changed in place (and returned, compiled or not).
"""

from typing import Union

import torch
import torch.nn as nn

from fastvit_kernels.patch.timm import patch_timm

# Inductor options of compile=True: freezing folds the (inference-only) weights into the graph as
# constants, which lets Inductor pre-pack them for oneDNN's GEMMs on CPU.
COMPILE_OPTIONS = {"freezing": True}


def optimize_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32, *,
                           compile: bool = False, fold_bn: bool = True) -> Union[nn.Module, "torch._dynamo.OptimizedModule"]:
    """Patch, fold, convert and (optionally) compile `model` for inference; see the module docs.

    Call the result under torch.inference_mode() (or torch.no_grad()) with inputs of `dtype`.
    dtype: torch.float32, torch.bfloat16 or torch.float16. fold_bn=False keeps LeViT's BatchNorms
    (for a model that is trained further after this). Raises TypeError if `model` is not an
    nn.Module and ValueError for another dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference: model must be an nn.Module, got {type(model).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"optimize_for_inference: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    model.eval()
    patch_timm(model, fold_bn=fold_bn)
    model.to(dtype)
    if compile:
        return torch.compile(model, options=COMPILE_OPTIONS)
    return model
