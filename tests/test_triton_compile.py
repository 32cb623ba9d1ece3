"""Ahead-of-time GPU compilation of every Triton kernel (fastvit_kernels.triton.compile_check).

The other tests run the Triton kernels in Triton's interpreter, which accepts code that the GPU
compiler rejects (tl.dot on blocks narrower than 16, bf16 dot lowering, mask types). These tests
compile the kernels for sm_80 and sm_90 with triton.compile (front end, LLVM, ptxas: no GPU
needed) in every configuration the launchers choose, as each module's compile_variants()
records it from the launchers themselves. A compile error, a kernel or dtype that
compile_variants never launches, or shared memory beyond the target GPU's fails; registers and
spills are reported (terminal summary, and the full table in build/triton_compile_report*.txt),
never fatal.

- test_compile_representative_subset (default): the representative subset: for every kernel, arch
  and dtype the smallest and largest block configuration, plus variants until every flag value,
  num_warps, num_stages, argument type and layout case occurs: 286 variants, ~170 CPU-seconds
  with an empty Triton cache (about 1.5-2 min on 2 idle cores; 2.7-5.3 min measured on 2 cores
  shared with other jobs), ~45 s with a warm cache.
- test_compile_full_sweep (marker `sweep`): all 20,408 variants (17,556 before the silu ones,
  measured at ~10,000 CPU-seconds: about 1.5 h on 2 idle cores, ~4 h on 2 shared cores; the
  silu variants add ~16%). Skipped unless `pytest -m sweep` or `pytest --sweep` is given;
  `python -m fastvit_kernels.triton.compile_check --jobs N --shard K/M` splits it over machines
  (and `--op` over kernel modules).

Both run compile_check in a subprocess without TRITON_INTERPRET (conftest.py sets it for the
interpreter tests, and @triton.jit reads it when the kernel modules are imported, so this process
only has interpreted kernels).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastvit_kernels
from fastvit_kernels.triton.compile_check import parse_ptxas_log

ROOT = Path(fastvit_kernels.__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except Exception:
        return False
    return "nvidia" in backends


def _run_compile_check(request, title, report, *args, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The subprocess imports the same fastvit_kernels as this one.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "fastvit_kernels.triton.compile_check", "--arch", "80", "90",
           "--report", str(ROOT / "build" / report), "--rows", "15", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if not re.match(r"  \d+/\d+ compiled", l)]
    request.config.__dict__.setdefault("_fastvit_summaries", []).append((title, lines))
    assert proc.returncode == 0, (
        f"compile_check failed (exit {proc.returncode}):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend")
def test_compile_representative_subset(request):
    _run_compile_check(request, "Triton AOT compile, representative subset (sm_80, sm_90)",
                       "triton_compile_report.txt", "--subset", timeout=1800)


@pytest.mark.sweep
@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend")
def test_compile_full_sweep(request):
    _run_compile_check(request, "Triton AOT compile, every variant (sm_80, sm_90)",
                       "triton_compile_report_full.txt", timeout=24 * 3600)


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '_fwd_kernel'
ptxas info    : Function properties for _fwd_kernel
    56 bytes stack frame, 60 bytes spill stores, 56 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size
"""
    usage = parse_ptxas_log(log)
    got = (usage["registers"], usage["spill_stores"], usage["spill_loads"], usage["stack"])
    assert got == (255, 60, 56, 56)
    assert usage["notes"] == ["wgmma serialized"]
