"""Options of the pytest-benchmark suite in this folder (test_kernels.py); see README.md.

    python -m pytest benchmarks/ --benchmark-only                      # every op beside its peers
    python -m pytest benchmarks/ --benchmark-only --bench-compile      # + the torch.compile peers
    python -m pytest benchmarks/ --benchmark-only --bench-batch 2 --benchmark-min-rounds 1
"""

import sys
from pathlib import Path

import pytest

# Run from a checkout, import the checkout's package (not another installed copy).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    group = parser.getgroup("fastvit_kernels benchmarks")
    group.addoption("--bench-batch", type=int, default=None,
                    help="batch of every case (default: each op's benchmark batch, e.g. 64 for bias_attention on CPU)")
    group.addoption("--bench-device", default="auto", help="cpu, cuda or auto (cuda if available)")
    group.addoption("--bench-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="default: float32 on CPU, float16 on CUDA")
    group.addoption("--bench-compile", action="store_true",
                    help="also time the torch.compile peers (compiling takes minutes on CPU)")


@pytest.fixture(scope="session")
def bench_options(request):
    """The suite's options: batch (None: each op's default), device, dtype, compile."""
    from fastvit_kernels.bench import common

    config = request.config
    device = common.resolve_device(config.getoption("--bench-device"))
    dtype_name = config.getoption("--bench-dtype")
    dtype = common.DTYPES[dtype_name] if dtype_name else (common.DTYPES["float16"] if device.type == "cuda"
                                                          else common.DTYPES["float32"])
    return {"batch": config.getoption("--bench-batch"), "device": device, "dtype": dtype,
            "compile": config.getoption("--bench-compile")}
