"""`python -m fastvit_kernels.info`: versions, what was built, and which backend each op uses.

Answers the question users of other kernel libraries keep asking: "which backend actually ran?"
"""

import importlib
import platform
import sys
from typing import Dict, List

import torch

import fastvit_kernels
from fastvit_kernels import _native, backends
# (`from ... import` reaches the op's module; `fastvit_kernels.ops.bias_attention` is the function.)
from fastvit_kernels.ops.bias_attention import BACKENDS as BIAS_ATTENTION_BACKENDS
from fastvit_kernels.ops.ggem_pool import BACKENDS as GGEM_POOL_BACKENDS
from fastvit_kernels.ops.policy_attention import BACKENDS as POLICY_ATTENTION_BACKENDS
from fastvit_kernels.ops.qna_attention import BACKENDS as QNA_ATTENTION_BACKENDS
from fastvit_kernels.ops.varlen_attention import BACKENDS as VARLEN_ATTENTION_BACKENDS

# The CPU ISA levels whose bf16 attention products are bf16 (csrc/isa/isa.h), and how.
BF16_PRODUCT_LEVELS = {"amx": "on the AMX tiles", "avx512bf16": "with vdpbf16ps"}
# The levels whose QnA forward also sums bf16 values in bf16, two taps per vdpbf16ps (channel
# pairs or stride-1 pixel lanes: csrc/isa/bf16_kernels.inc); at amx it stays in fp32 (vdpbf16ps
# is slow there).
QNA_VALUE_PAIR_LEVELS = ("avx512bf16",)

# Every op: (its backend declarations, a function making small sample inputs on a device).
OPS = {
    "bias_attention": (
        BIAS_ATTENTION_BACKENDS,
        lambda device: (
            torch.randn(1, 2, 4, 16, device=device),
            torch.randn(1, 2, 4, 16, device=device),
            torch.randn(1, 2, 4, 32, device=device),
            torch.randn(2, 4, device=device),
            torch.zeros(4, 4, dtype=torch.long, device=device),
        ),
    ),
    "qna_attention": (
        QNA_ATTENTION_BACKENDS,
        lambda device: (
            torch.randn(1, 4, 4, 2, 2, device=device),  # cost [B, Hi, Wi, Q, h]
            torch.randn(1, 4, 4, 2, 8, device=device),  # v [B, Hi, Wi, h, d]
            torch.zeros(9, 2, 2, device=device),
            torch.ones(9, 2, 2, device=device),
            3,
            1,
        ),
    ),
    "ggem_pool": (
        GGEM_POOL_BACKENDS,
        lambda device: (
            torch.randn(1, 5, 16, device=device),  # x [B, N, C]
            torch.full((4,), 3.0, device=device),  # p [groups]
        ),
    ),
    "policy_attention": (
        POLICY_ATTENTION_BACKENDS,
        lambda device: (
            torch.randn(1, 2, 5, 16, device=device),  # q, k, v [B, H, N, D]
            torch.randn(1, 2, 5, 16, device=device),
            torch.randn(1, 2, 5, 16, device=device),
            torch.ones(1, 5, device=device),  # policy [B, N] float32
            0.25,
            1e-6,
        ),
    ),
    "varlen_attention": (
        VARLEN_ATTENTION_BACKENDS,
        lambda device: (
            torch.randn(5, 2, 16, device=device),  # q, k, v [T, H, D]
            torch.randn(5, 2, 16, device=device),
            torch.randn(5, 2, 16, device=device),
            torch.tensor([0, 2, 5], device=device),  # cu_seqlens int64
            3,
            0.25,
        ),
    ),
}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as error:  # missing, or broken import
        return f"not available ({type(error).__name__})"


def collect() -> Dict[str, object]:
    """Everything the report prints, as data (tests read it)."""
    info: Dict[str, object] = {
        "fastvit_kernels": fastvit_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native_built": _native.available(),
        "native_error": _native.load_error,
        "forced_backend": backends.forced_backend(),
        "verified_on_gpu": dict(backends.VERIFIED_ON_GPU),
    }
    if _native.available():
        info["cpu_isa"] = _native.native.cpu_isa()
        info["compiled_isas"] = list(_native.native.compiled_isas())
        info["supported_isas"] = list(_native.native.supported_isas())
    ops: Dict[str, Dict[str, object]] = {}
    for name, (op_backends, sample) in OPS.items():
        per_device: Dict[str, object] = {}
        devices: List[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            inputs = sample(device)
            try:
                chosen = op_backends.select(device, *inputs).name
            except RuntimeError as error:
                chosen = f"none ({error})"
            per_device[device] = {"backend": chosen, "refusals": op_backends.reasons(*inputs)}
        if not torch.cuda.is_available():
            per_device["cuda"] = {
                "backend": f"no CUDA device here; on one: first of {op_backends.order_for('cuda')} that fits",
                "refusals": {},
            }
        ops[name] = per_device
    info["ops"] = ops
    return info


def main() -> None:
    info = collect()
    print(f"fastvit_kernels {info['fastvit_kernels']}")
    print(f"  python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
          f"triton {info['triton']}, timm {info['timm']}")
    print(f"  CUDA device: {info['cuda_device'] or 'none'}")
    if info["native_built"]:
        print(f"  native CPU kernels: built; ISA in use {info['cpu_isa']} "
              f"(compiled {', '.join(info['compiled_isas'])}; this CPU supports "
              f"{', '.join(info['supported_isas'])})")
        if info["cpu_isa"] in BF16_PRODUCT_LEVELS:
            qna = (", as do the values of the qna_attention forward (two taps per vdpbf16ps)"
                   if info["cpu_isa"] in QNA_VALUE_PAIR_LEVELS else "")
            print(f"    {info['cpu_isa']}: bf16 inputs of bias / policy / varlen attention multiply in "
                  f"bf16 (fp32 accumulation) {BF16_PRODUCT_LEVELS[info['cpu_isa']]}{qna}; everything "
                  "else computes in fp32 as at avx512")
    else:
        print(f"  native CPU kernels: NOT available: {info['native_error']}")
    forced = info["forced_backend"]
    print(f"  backend forced: {forced or f'no (set {backends.ENV_VAR} or use fastvit_kernels.use_backend)'}")
    verified = info["verified_on_gpu"] or "none yet (GPU kernels are opt-in: force 'triton')"
    print(f"  GPU backends verified by a GPU test run: {verified}")
    print("ops:")
    for name, per_device in info["ops"].items():
        print(f"  {name}")
        for device, choice in per_device.items():
            print(f"    {device:5s} tensors -> {choice['backend']}")
            for backend, reasons in choice["refusals"].items():
                if reasons:
                    print(f"      {backend} cannot run: {'; '.join(reasons)}")


if __name__ == "__main__":
    sys.exit(main())
