"""timm's workflows on patched models: FX, TorchScript, feature extraction, ONNX export.

A patched model must keep working wherever the timm model works (docs/patching.md, "Workflows").
Each check compares against the unpatched timm model running the same workflow (LeViT) or against
the patched model in eager mode (GGeM-pooled ViTs, whose function differs from timm's pooling):
  - FX: torch.fx.symbolic_trace, forward and backward through the traced module (gradients land
    in the shared parameters), and timm's FX feature extractor on a node both graphs have;
  - TorchScript: torch.jit.script, forward;
  - features_only=True models and forward_intermediates, forward and backward;
  - ONNX: both exporters (dynamo and TorchScript), run in ONNX Runtime with another batch size
    than the one exported (dynamic batch), float32 within 1e-4 of the largest |output|.
Weights are randomised (test_patch_timm.randomize_): timm zero-initialises the BatchNorm after
each attention, which would hide the attention from every comparison.

Cost: CI runs a representative subset (linear and conv LeViT, Hardswish and SiLU, one GGeM ViT);
every supported model runs with `-m sweep`.
"""

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from test_patch_timm import ALL_MODELS, OUT_RTOL, assert_close, assert_grads_close, image, randomize_  # noqa: E402
from test_timm_families import randomize_family_  # noqa: E402

from fastvit_kernels import _native  # noqa: E402
from fastvit_kernels.patch import patch_timm  # noqa: E402

LEVIT_SUBSET = ["levit_128s", "levit_conv_128s", "levit_256d"]
GGEM_MODELS = ["vit_tiny_patch16_224", "vit_little_patch16_reg4_gap_256"]
GGEM_SUBSET = ["vit_tiny_patch16_224"]
# The package's own timm models (not patched: built on the fused ops), exported as they are;
# DynamicViT in its default inference mode (top-k).
OWN_MODELS = ["qna_vit_tiny", "dynamicvit_deit_small"]
# One model per family of the other bias-table attentions (Swin, TinyViT, EfficientFormer,
# EfficientViT-MSRA, EfficientFormerV2); CI runs the first two.
FAMILY_MODELS = ["swin_tiny_patch4_window7_224", "efficientvit_m0", "tiny_vit_5m_224", "efficientformer_l1",
                 "efficientformerv2_s0"]
FAMILY_SUBSET = FAMILY_MODELS[:2]
ONNX_SUBSET = ["levit_128s", "levit_conv_128s", "vit_tiny_patch16_224", "qna_vit_tiny", "dynamicvit_deit_small",
               "swin_tiny_patch4_window7_224", "efficientvit_m0"]
ONNX_RTOL = 1e-4
needs_native = pytest.mark.skipif(not _native.available(), reason="TorchScript calls the native CPU kernels")


def every_model(subset, models=ALL_MODELS + GGEM_MODELS + FAMILY_MODELS):
    """Every supported model; those outside `subset` only with -m sweep."""
    return [name if name in subset else pytest.param(name, marks=pytest.mark.sweep) for name in models]


def build_pair(name, **kwargs):
    """(reference, patched): LeViT -> (unpatched timm, patched copy); ViT -> (patched, patched)
    with GGeM pooling and the package's own models -> (model, model), the reference being the
    same model run eagerly."""
    torch.manual_seed(0)
    if name in FAMILY_MODELS:
        model = randomize_family_(timm.create_model(name, pretrained=False, **kwargs))
        return model, patch_timm(copy.deepcopy(model))
    model = randomize_(timm.create_model(name, pretrained=False, **kwargs))
    if name.startswith("levit"):
        return model, patch_timm(copy.deepcopy(model))
    if name not in OWN_MODELS:
        patch_timm(model, pool="ggem")
    return model, model


def build_eval_pair(name, fold_bn=False):
    """build_pair in eval mode, the patched LeViT folded with fold_bn=True (skips other models)."""
    if fold_bn and not name.startswith("levit"):
        pytest.skip("BatchNorm folding is LeViT's")
    ref, ours = build_pair(name)
    ref.eval(), ours.eval()
    if fold_bn:
        patch_timm(ours, fold_bn=True)
    return ref, ours


def timm_supports(workflow, run):
    """Runs `run()` on the unpatched timm model; skips the test (naming the error) when timm's own
    model cannot do the workflow: a patched model only has to work where timm's does."""
    try:
        return run()
    except Exception as error:  # e.g. FX tracing of EfficientViT's and TinyViT's input-size control flow
        pytest.skip(f"timm's own model does not support {workflow}: {type(error).__name__}: {str(error)[:200]}")


def input_for(model, batch=2, seed=1):
    return image(model.pretrained_cfg["input_size"][1:], batch=batch, seed=seed)


def forward_backward(model, x, seed=2):
    """Output, then backward of a fixed random projection of it (gradients land in .grad)."""
    out = model(x)
    outputs = out if isinstance(out, (list, tuple)) else [out]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    loss.backward()
    return outputs


def zero_grads(*models):
    for model in models:
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# FX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", every_model(LEVIT_SUBSET + GGEM_SUBSET + FAMILY_SUBSET))
def test_fx_symbolic_trace_forward_backward(name):
    ref, ours = build_pair(name)
    ref.eval(), ours.eval()
    if name in FAMILY_MODELS:
        timm_supports("torch.fx.symbolic_trace", lambda: torch.fx.symbolic_trace(copy.deepcopy(ref)))
    traced = torch.fx.symbolic_trace(ours)
    x = input_for(ours)
    expected = forward_backward(ref, x)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    zero_grads(ours)
    got = forward_backward(traced, x)  # the traced module shares `ours`' parameters
    assert_close("traced output", got[0], expected[0], OUT_RTOL)
    for n, p in ref.named_parameters():
        p.grad = ref_grads[n]
    assert_grads_close(ours, ref)


@pytest.mark.parametrize("name", every_model(LEVIT_SUBSET + GGEM_SUBSET + FAMILY_SUBSET))
def test_timm_fx_feature_extractor(name):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    ref, ours = build_pair(name)
    ref.eval(), ours.eval()
    ref_nodes = set(timm_supports("FX feature extraction", lambda: get_graph_node_names(ref))[1])
    # The last node of the second-to-last stage or block that both graphs have, and the output.
    common = [n for n in get_graph_node_names(ours)[1] if n in ref_nodes]
    inner = [n for n in common if n.startswith(("stages.1.", "blocks.10.", "blocks.4.", "layers.1."))][-1]
    nodes = {inner: "inner", common[-1]: "out"}
    x = input_for(ours)
    with torch.no_grad():
        got = create_feature_extractor(ours, return_nodes=nodes)(x)
        expected = create_feature_extractor(ref, return_nodes=nodes)(x)
    for key in ("inner", "out"):
        assert_close(f"node {key}", got[key], expected[key], OUT_RTOL)


# ---------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("name", every_model(LEVIT_SUBSET + GGEM_SUBSET + FAMILY_SUBSET))
def test_torchscript_forward(name, fold_bn):
    ref, ours = build_eval_pair(name, fold_bn)
    if name in FAMILY_MODELS:
        timm_supports("torch.jit.script", lambda: torch.jit.script(copy.deepcopy(ref)))
    scripted = torch.jit.script(ours)
    x = input_for(ours)
    with torch.no_grad():
        assert_close("scripted output", scripted(x), ref(x), OUT_RTOL)


def test_torchscript_without_native_kernels_names_the_module(monkeypatch):
    _, ours = build_pair("levit_128s")
    monkeypatch.setattr(_native, "has_kernel", lambda name: False)
    with pytest.raises(RuntimeError, match="torch.jit.script of BiasAttention needs the native CPU kernels"):
        torch.jit.script(ours)


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", every_model(LEVIT_SUBSET + FAMILY_SUBSET, ALL_MODELS + FAMILY_MODELS))  # (no pooling in features_only ViTs)
def test_features_only(name):
    if name in FAMILY_MODELS:
        timm_supports("features_only=True", lambda: timm.create_model(name, pretrained=False, features_only=True,
                                                                     device="meta"))
    ref, ours = build_pair(name, features_only=True)
    ref.eval(), ours.eval()
    x = input_for(ours)
    expected = forward_backward(ref, x)
    got = forward_backward(ours, x)
    assert len(got) == len(expected) >= 3
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(f"feature {i}", g, e, OUT_RTOL)
    assert_grads_close(ours, ref)


@pytest.mark.parametrize("name", every_model(LEVIT_SUBSET + GGEM_SUBSET + FAMILY_SUBSET))
def test_forward_intermediates(name):
    ref, ours = build_pair(name)
    ref.eval(), ours.eval()
    x = input_for(ours)
    with torch.no_grad():
        final, intermediates = ours.forward_intermediates(x)
        ref_final, ref_intermediates = ref.forward_intermediates(x)
    assert_close("final features", final, ref_final, OUT_RTOL)
    assert len(intermediates) == len(ref_intermediates) > 0
    for i, (g, e) in enumerate(zip(intermediates, ref_intermediates)):
        assert_close(f"intermediate {i}", g, e, OUT_RTOL)


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def onnx_export(model, x, path, dynamo: bool):
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("fold_bn", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("name", every_model(ONNX_SUBSET, ALL_MODELS + GGEM_MODELS + OWN_MODELS + FAMILY_MODELS))
def test_onnx_export_runs_in_onnxruntime(name, fold_bn, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ref, ours = build_eval_pair(name, fold_bn)
    path = str(tmp_path / f"{name}.onnx")
    onnx_export(ours, input_for(ours, batch=2), path, dynamo)
    model = onnx_load_checked(path)
    assert not [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")], "non-standard ONNX ops"
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = input_for(ours, batch=3, seed=5)  # another batch size than exported
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = ref(x)
    assert_close("ONNX Runtime output", torch.from_numpy(got), expected, ONNX_RTOL)


def onnx_load_checked(path):
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model)
    return model


@needs_native
def test_torchscript_refuses_cuda_tensors_by_name():
    # The scripted module calls the native CPU op; a CUDA input must name the module, not fail in
    # the dispatcher. (The meta device stands in for CUDA: same branch, no GPU needed.)
    _, ours = build_pair("levit_128s")
    scripted = torch.jit.script(ours.eval().to("meta"))
    with pytest.raises(Exception, match="BiasAttention under TorchScript runs the native CPU kernels only"):
        scripted(torch.empty(1, 3, 224, 224, device="meta"))
