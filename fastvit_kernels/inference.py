"""The recommended inference path: `optimize_for_inference(model, dtype=..., compile=...)`.

    model = fastvit_kernels.optimize_for_inference(timm.create_model("levit_256"), dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(images.to(torch.bfloat16))

What it does, in order (each step is also a public function, see docs/serving.md):
  1. eval mode;
  2. patch_timm(model, fold_bn=True): the fused attention modules, LeViT's BatchNorms folded into
     their Linear / Conv2d layers and the stem's convolution + Hardswish fused;
  3. the dtype (bfloat16 runs the Linear layers through oneDNN, on AMX where the CPU has it, and
     the attention kernels' bf16 paths); in bfloat16 / float16 the stem's convolutions run
     channels-last (their weights stored so; images already in channels-last memory skip one
     conversion);
  4. with compile=True, `compile_frozen(model)`: torch.compile with Inductor's freezing (weights
     become constants, pre-packed for oneDNN / MKL) and, in bfloat16 / float16 (autotune=None,
     the default), Inductor's max-autotune GEMM selection (its C++ GEMM template: AMX micro-kernels
     where the CPU has AMX, else fp32 FMA ones, with the following elementwise work fused) —
     recommended for steady serving; compile=False keeps the eager model (no compile time, no
     recompiles for new shapes).
The model is changed in place (and returned, compiled or not).
"""

from typing import Optional

import torch
import torch.nn as nn

from fastvit_kernels.patch.timm import patch_timm

# Inductor options of autotune=True: time Inductor's C++ GEMM template (AMX micro-kernels in bf16
# on AMX CPUs, else fp32 FMA ones; epilogues fused) against ATen's oneDNN / MKL GEMM for every
# Linear and keep the faster.
AUTOTUNE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def default_autotune(dtype: torch.dtype) -> bool:
    """autotune=None means: max-autotune for bfloat16 / float16, where Inductor's AMX GEMM
    template beat oneDNN at LeViT's small GEMMs (measured on an AMX CPU; without AMX the timing
    still keeps the faster of the two per GEMM, only the compile is longer), not for float32,
    where it kept MKL's GEMMs for LeViT and DynamicViT anyway (same speed) and made QnA-ViT
    tiny_7x7 ~10% slower, its isolated GEMM timings not seeing the fusions around them
    (docs/serving.md, "Compile")."""
    return dtype != torch.float32


class FrozenCompiled(nn.Module):
    """torch.compile(model) whose graphs are compiled with Inductor's freezing.

    Freezing has to be on while Dynamo traces, not only inside Inductor: with
    torch.compile(model, options={"freezing": True}) Dynamo still passes the weights as graph
    inputs and Inductor can neither fold nor pre-pack them (docs/serving.md, "Compile"). So the
    setting is switched on around each call (any call may compile: a new batch size recompiles)
    and restored after, leaving the process's other compiles alone. Freezing applies to calls
    without grad (inference_mode / no_grad); a call with grad compiles a normal graph.
    """

    def __init__(self, model: nn.Module, autotune: bool = True, **compile_kwargs):
        super().__init__()
        options = {**(AUTOTUNE_OPTIONS if autotune else {}), **compile_kwargs.pop("options", {})}
        self.options = options  # the Inductor options it compiles with (freezing is added per call)
        self.compiled = torch.compile(model, options=options or None, **compile_kwargs)

    def forward(self, *args, **kwargs):
        from torch._inductor import config as inductor_config

        previous = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return self.compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = previous


def compile_frozen(model: nn.Module, *, autotune: bool = True, **compile_kwargs) -> FrozenCompiled:
    """torch.compile for inference with freezing (and max-autotune GEMMs); see FrozenCompiled.
    compile_kwargs go to torch.compile (fullgraph=True, options={"cpp_wrapper": True}, ...)."""
    return FrozenCompiled(model, autotune, **compile_kwargs)


def package_for_inference(model: nn.Module, example_inputs: tuple, package_path: str, *,
                          autotune: Optional[bool] = None) -> str:
    """torch.export `model` (run it through optimize_for_inference first) and build an
    AOTInductor package at `package_path`, with freezing and, with autotune=True, max-autotune
    GEMMs (None: default_autotune of the first floating-point example input's dtype); returns the
    path for torch._inductor.aoti_load_package. The package calls the fused ops from C++ (the
    serving process needs `import fastvit_kernels`; docs/serving.md)."""
    if autotune is None:
        dtype = next((x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()),
                     torch.float32)
        autotune = default_autotune(dtype)
    configs = {"freezing": True, **(AUTOTUNE_OPTIONS if autotune else {})}
    with torch.no_grad():
        program = torch.export.export(model, tuple(example_inputs))
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path,
                                                        inductor_configs=configs)


def _channels_last_stem(model: nn.Module) -> None:
    """The fused stem convolutions' weights in channels-last memory (same Parameters), which makes
    them run channels-last (ConvHardswish). In bfloat16 oneDNN otherwise computes LeViT's stem in
    NCHW: levit_128s batch 32 compiled measured 37.4 -> 35.2 ms with NCHW input images, 30.9 ms
    with channels-last ones, one thread (docs/serving.md). Not in float32, where ConvHardswish's own
    oneDNN call is faster with the plain weight layout."""
    from fastvit_kernels.modules.conv_hardswish import ConvHardswish

    for module in model.modules():
        if isinstance(module, ConvHardswish):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)


def optimize_for_inference(model: nn.Module, dtype: torch.dtype = torch.float32, *,
                           compile: bool = False, autotune: Optional[bool] = None,
                           fold_bn: bool = True) -> nn.Module:
    """Patch, fold, convert and (optionally) compile `model` for inference; see the module docs.

    Call the result under torch.inference_mode() (or torch.no_grad()) with inputs of `dtype`.
    dtype: torch.float32, torch.bfloat16 or torch.float16. compile=True returns
    compile_frozen(model, autotune=autotune); autotune=None picks default_autotune(dtype) (on in
    half precision, off in float32); autotune=False compiles in seconds instead of about a minute
    per input shape, with oneDNN / MKL for every GEMM. fold_bn=False keeps LeViT's
    BatchNorms (for a model that is trained further after this). Raises TypeError if `model` is
    not an nn.Module and ValueError for another dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference: model must be an nn.Module, got {type(model).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"optimize_for_inference: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    model.eval()
    patch_timm(model, fold_bn=fold_bn)
    model.to(dtype)
    if dtype != torch.float32:
        _channels_last_stem(model)
    if compile:
        return compile_frozen(model, autotune=default_autotune(dtype) if autotune is None else autotune)
    return model
