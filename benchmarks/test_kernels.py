"""pytest-benchmark suite: each fused op beside its peers at a real model shape, forward and
forward+backward.

The cases are the bench modules' own (fastvit_kernels/bench/<op>.py): the same inputs,
implementations and float64 oracle as `python -m fastvit_kernels.bench.<op>`. Each benchmark first
checks one call against the float64 oracle (relative error below common.REL_TOL of the dtype),
then times the call. Benchmarks are grouped "<op> <case> B=<batch> <pass>", so

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group

prints each op beside its peers. torch.compile peers (and FlexAttention, compiled too) run with
--bench-compile only. See benchmarks/README.md for saving and comparing runs.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

from fastvit_kernels.bench import bias_attention, common, ggem_pool, policy_attention, qna_attention, varlen_attention


@dataclass(frozen=True)
class OpCase:
    op: str
    case: str  # the case name, as in the bench module's rows
    make: Callable[[int, torch.dtype, torch.device], object]  # (batch, dtype, device) -> the module's Case
    batch: Tuple[int, int]  # default batch on CPU, on CUDA (the bench modules' defaults)
    peers: Tuple[str, ...]  # the op and its eager peers
    compiled: Tuple[str, ...]  # peers that run only with --bench-compile


def _bias(name):
    return lambda batch, dtype, device: bias_attention.Case(bias_attention.select_shapes([name])[0], batch, dtype, device)


CASES = (
    OpCase("bias_attention", "128s.attn14", _bias("128s.attn14"), (64, 256),
           ("op", "eager", "sdpa"), ("compile", "flex")),
    OpCase("bias_attention", "128s.shrink14-7", _bias("128s.shrink14-7"), (64, 256),
           ("op", "eager", "sdpa"), ("compile", "flex")),
    OpCase("qna_attention", "s0.qna.k3",
           lambda batch, dtype, device: qna_attention.Case(qna_attention.select_shapes(["s0.qna"])[0], 3, batch,
                                                           dtype, device),
           (32, 128), ("op", "unfold", "conv"), ("compile-unfold", "compile-conv")),
    OpCase("policy_attention", "policy.keep0.7",
           lambda batch, dtype, device: policy_attention.Case(batch, 0.7, dtype, device),
           (64, 256), ("op", "eager", "sdpa"), ("compile",)),
    OpCase("varlen_attention", "varlen.threshold",
           lambda batch, dtype, device: varlen_attention.Case(
               "varlen.threshold", varlen_attention.threshold_lengths(batch), dtype, device),
           (64, 256), ("op", "padded", "loop"), ()),
    OpCase("ggem_pool", "vit_b",
           lambda batch, dtype, device: ggem_pool.Case(ggem_pool.select_shapes(["vit_b"])[0], batch, dtype, device),
           (256, 256), ("op", "eager"), ("compile",)),
)
PASSES = ("fwd", "fwd+bwd")

PARAMS = [
    pytest.param(spec, pass_, impl, id=f"{spec.op}-{spec.case}-{pass_}-{impl}")
    for spec in CASES
    for pass_ in PASSES
    for impl in spec.peers + spec.compiled
]


@functools.lru_cache(maxsize=1)  # the tests of one (case, pass) run one after the other
def _case_and_oracle(spec: OpCase, pass_: str, batch: int, dtype: torch.dtype, device: torch.device):
    case = spec.make(batch, dtype, device)
    return case, case.oracle(need_grads=pass_ != "fwd")


@pytest.mark.parametrize("spec, pass_, impl", PARAMS)
def test_kernel(benchmark, bench_options, spec: OpCase, pass_: str, impl: str):
    if impl in spec.compiled and not bench_options["compile"]:
        pytest.skip("torch.compile peer: run with --bench-compile")
    device, dtype = bench_options["device"], bench_options["dtype"]
    batch = bench_options["batch"] or spec.batch[device.type == "cuda"]
    case, want = _case_and_oracle(spec, pass_, batch, dtype, device)
    try:
        run = case.make_callable(impl, pass_)
        got = run()  # the first call (compiles a compiled peer): checked, not timed
    except Exception as error:  # e.g. FlexAttention has no backward on CPU
        pytest.skip(f"{impl} cannot run here: {common.short_error(error)}")
    err = common.max_rel_err(got, want[:len(got)])
    assert err < common.REL_TOL[dtype], f"{impl} {pass_}: relative error {err:.2e} against the float64 oracle"

    benchmark.group = f"{spec.op} {spec.case} B={batch} {pass_}"
    benchmark.extra_info.update(case.row_fields(), **{"pass": pass_}, impl=impl, max_rel_err=err)
    if impl == "op":
        benchmark.extra_info["backend"] = case.backend()
    if device.type == "cuda":
        benchmark(lambda: (run(), torch.cuda.synchronize(device)))
    else:
        benchmark(run)
