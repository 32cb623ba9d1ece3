"""The inference path (fastvit_kernels.optimize_for_inference, docs/serving.md): patched, folded
LeViT in float32 and bfloat16, eager, under torch.compile (fullgraph, cpp_wrapper, freezing) and as
an AOTInductor package, matches eager timm; the packaged model runs the fused ops without calling
back into Python; bad input keeps its error on the compiled path."""

import copy
import os
import sys

import pytest
import torch

from fastvit_kernels import _native

timm = pytest.importorskip("timm")
from fastvit_kernels import compile_frozen, optimize_for_inference, package_for_inference  # noqa: E402
from fastvit_kernels.bench.levit import build_levit  # noqa: E402

needs_native = pytest.mark.skipif(not _native.available(), reason="the C++ kernels are not built")
MODELS = ["levit_128s", "levit_conv_128s"]
# Max relative error of the optimized model against eager float32 timm: float32 differs by the
# folding's rounding; bfloat16 by running every layer in bf16 (timm itself in bf16 reaches ~7e-3
# on these inputs).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(got, want):
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def levit_pairs():
    """name -> (timm model with randomised biases and BatchNorm statistics, input, its eager output)."""
    out = {}
    for name in MODELS:
        model = build_levit(name, torch.device("cpu"), seed=1)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            out[name] = (model, x, model(x))
    return out


def test_bad_arguments_name_them():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        optimize_for_inference("levit_128s")
    with pytest.raises(ValueError, match="dtype must be .* got torch.int8"):
        optimize_for_inference(torch.nn.Linear(2, 2), torch.int8)


@pytest.mark.parametrize("name", MODELS)
def test_half_precision_stem_runs_channels_last(levit_pairs, name):
    """bfloat16: the fused stem convolutions' weights are stored channels-last (float32 keeps its
    layout) and give the result of the same weights in NCHW, for NCHW and channels-last images."""
    from fastvit_kernels.modules.conv_hardswish import ConvHardswish

    model, x, _ = levit_pairs[name]
    stems = {}
    for dtype in (torch.float32, torch.bfloat16):
        optimized = optimize_for_inference(copy.deepcopy(model), dtype)
        stems[dtype] = [m for m in optimized.modules() if isinstance(m, ConvHardswish)]
        assert len(stems[dtype]) == 4
    assert all(m.weight.is_contiguous() for m in stems[torch.float32])
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in stems[torch.bfloat16])
    nchw = copy.deepcopy(optimized)
    for m in nchw.modules():
        if isinstance(m, ConvHardswish):
            m.weight.data = m.weight.data.contiguous()
    xb = x.to(torch.bfloat16)
    with torch.inference_mode():
        want = nchw(xb)
        for images in (xb, xb.contiguous(memory_format=torch.channels_last)):
            assert rel_err(optimized(images), want.float()) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_eager_matches_timm(levit_pairs, name, dtype):
    model, x, want = levit_pairs[name]
    optimized = optimize_for_inference(copy.deepcopy(model), dtype)
    report = optimized.fastvit_kernels_report
    assert report.num_replaced > 0 and report.folded_batchnorms > 0
    with torch.inference_mode():
        assert rel_err(optimized(x.to(dtype)), want) < TOL[dtype]


def generated_code(fn, *args):
    """Inductor's generated source of the graphs compiled while running fn(*args)."""
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode():
        out, code = run_and_get_code(fn, *args)
    return out, "\n".join(code)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_fullgraph_cpp_wrapper_freezing_matches_timm(levit_pairs, dtype):
    """compile_frozen (the recipe's compiler, without autotuning here) with fullgraph=True and
    Inductor's C++ wrapper: the weights are frozen into the graph and the output matches."""
    model, x, want = levit_pairs["levit_128s"]
    optimized = optimize_for_inference(copy.deepcopy(model), dtype)
    torch._dynamo.reset()
    compiled = compile_frozen(optimized, autotune=False, fullgraph=True, options={"cpp_wrapper": True})
    out, code = generated_code(compiled, x.to(dtype))
    assert "_frozen_param" in code, "freezing did not apply: the weights are still graph inputs"
    assert rel_err(out, want) < TOL[dtype]


@needs_native
def test_recommended_compile_freezes_and_autotunes(levit_pairs):
    """optimize_for_inference(compile=True) as the README recommends (freezing + max-autotune GEMMs),
    bf16 at batch 2: frozen weights, the fused op in the graph, output matches timm; and freezing
    is switched off again after the call (the process's other compiles are left alone)."""
    from torch._inductor import config as inductor_config

    model, x, want = levit_pairs["levit_128s"]
    torch._dynamo.reset()
    compiled = optimize_for_inference(copy.deepcopy(model), torch.bfloat16, compile=True)
    out, code = generated_code(compiled, x.to(torch.bfloat16))
    assert "_frozen_param" in code and "fastvit_kernels.bias_attention_forward" in code
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert inductor_config.freezing is False


def test_recommended_compile_autotunes_in_half_precision_only():
    """autotune=None: max-autotune GEMMs in bfloat16 / float16, not in float32 (docs/serving.md,
    "Compile"); an explicit autotune wins."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    for dtype, want in ((torch.float32, False), (torch.bfloat16, True), (torch.float16, True)):
        compiled = optimize_for_inference(copy.deepcopy(model), dtype, compile=True)
        assert compiled.options.get("max_autotune", False) is want, dtype
    forced = optimize_for_inference(copy.deepcopy(model), torch.float32, compile=True, autotune=True)
    assert forced.options["max_autotune"] is True


def python_functions_called(fn, package: str = "fastvit_kernels"):
    """Names of the Python functions of `package` that run during fn()."""
    called = set()

    def profile(frame, event, arg):
        if event == "call" and package in frame.f_code.co_filename:
            called.add(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return called


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_aoti_package_matches_timm_without_python(levit_pairs, name, dtype, tmp_path):
    """torch.export keeps the fused op; the AOTInductor package loads, matches eager timm, and
    runs without calling any fastvit_kernels Python (the ops are dispatched from C++)."""
    model, x, want = levit_pairs[name]
    optimized = optimize_for_inference(copy.deepcopy(model), dtype)
    xd = x.to(dtype)
    with torch.no_grad():
        program = torch.export.export(optimized, (xd,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fastvit_kernels.bias_attention_forward.default" in targets
    # The recipe's packaging (freezing; autotuning only for bf16 levit_128s, to bound CI time).
    autotune = name == "levit_128s" and dtype == torch.bfloat16
    path = package_for_inference(optimized, (xd,), os.fspath(tmp_path / "levit.pt2"), autotune=autotune)
    runner = torch._inductor.aoti_load_package(path)
    with torch.inference_mode():
        got = runner(xd)
        assert rel_err(got, want) < TOL[dtype]
        assert python_functions_called(lambda: runner(xd)) == set()
        assert torch.equal(runner(xd), got)


@needs_native
def test_compiled_op_keeps_its_index_error():
    """A bias index out of range raises the eager error text from inside a compiled graph."""
    from fastvit_kernels.ops import bias_attention

    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    table = torch.randn(2, 5)
    index = torch.randint(0, 5, (7, 7))
    index[3, 4] = 9
    compiled = torch.compile(lambda q, k, v, t, i: bias_attention(q, k, v, t, i), fullgraph=True)
    for fn in (bias_attention, compiled):
        with pytest.raises(IndexError, match=r"bias_index values must be in \[0, T=5\).*got values from 0 to 9"):
            fn(q, k, v, table, index)
