"""`python -m fastvit_kernels.info`, and the package without its native extension."""

import subprocess
import sys

from fastvit_kernels import info


def test_info_reports_every_op_and_backend():
    data = info.collect()
    for op in ("bias_attention", "qna_attention", "ggem_pool", "policy_attention", "varlen_attention"):
        cpu = data["ops"][op]["cpu"]
        assert cpu["backend"] in ("cpu", "reference"), (op, cpu)
        assert set(cpu["refusals"]) == {"reference", "cpu", "triton"}
    result = subprocess.run([sys.executable, "-m", "fastvit_kernels.info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "bias_attention" in result.stdout and "qna_attention" in result.stdout and "ggem_pool" in result.stdout and "policy_attention" in result.stdout and "varlen_attention" in result.stdout and "cpu   tensors ->" in result.stdout


def test_info_reports_the_forced_cpu_isa():
    """Each level this CPU runs (amx and avx512bf16 included), forced through
    FASTVIT_KERNELS_CPU_ISA, is the one reported as in use, with the note of a bf16-product level."""
    import os

    from fastvit_kernels import _native

    if not _native.available():
        return
    for isa in _native.native.supported_isas():
        env = dict(os.environ, FASTVIT_KERNELS_CPU_ISA=isa)
        result = subprocess.run([sys.executable, "-m", "fastvit_kernels.info"], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert f"ISA in use {isa} (" in result.stdout, (isa, result.stdout)
        for level in info.BF16_PRODUCT_LEVELS:
            assert (f"{level}: bf16 inputs" in result.stdout) == (isa == level), result.stdout
        assert ("qna_attention forward" in result.stdout) == (isa in info.QNA_VALUE_PAIR_LEVELS), result.stdout


# A fresh interpreter in which importing the extension fails, as after a broken or missing build.
WITHOUT_NATIVE = r"""
import sys, warnings
sys.modules["fastvit_kernels._C"] = None  # makes `import fastvit_kernels._C` raise ImportError
import torch, fastvit_kernels
from fastvit_kernels import info
from fastvit_kernels.ops.bias_attention import select_backend
q = torch.randn(1, 2, 5, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fastvit_kernels.ops.bias_attention(q, q, q, activation="hardswish")
assert select_backend(q, q, q).name == "reference"
assert any("native CPU kernels are not available" in str(w.message) for w in caught), caught
assert not info.collect()["native_built"]
print("fallback ok", tuple(out.shape))
"""


def test_import_and_fallback_without_native_extension():
    result = subprocess.run([sys.executable, "-c", WITHOUT_NATIVE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fallback ok (1, 2, 5, 16)" in result.stdout
