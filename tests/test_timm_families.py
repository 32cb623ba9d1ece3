"""patch_timm on the other timm families whose attention adds a learned bias table: Swin (v1),
TinyViT, EfficientFormer, EfficientViT-MSRA, EfficientFormerV2's downsampling attention; and the
report for the classes left alone (EfficientFormerV2's talking-heads attention, Swin V2).

Parity (docs/patching.md, "Families"): against a float64 copy of the unpatched model, the
patched float32 model's output error and its gradients' error (RMS over every parameter of the
relative error) must be within 2x the error timm's own float32 model makes; every single
gradient within 20x (a wrong gradient is off by ~100%, rounding by ~1e-6). Weights are randomised: timm zero-initialises TinyViT's, EfficientViT's and
EfficientFormer's bias tables, starts Swin's at std 0.02, EfficientFormer's layer scales at 1e-5
and EfficientViT's last BatchNorm of each branch at 0, any of which would hide the attention.

Cost: CI runs the smallest model of each family at its default size, and Swin and EfficientViT
at a second, non-square size (padded, shifted windows); every model at both sizes runs with
`-m sweep`.
"""

import copy

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

from test_patch_timm import image, randomize_  # noqa: E402

from fastvit_kernels.modules import timm_attention  # noqa: E402
from fastvit_kernels.patch import patch_timm, registry, supported_timm_models, unpatch_timm  # noqa: E402

FAMILY_PATTERNS = ("swin_*", "tiny_vit_*", "efficientformer_l*", "efficientvit_m*", "efficientformerv2_*")
FAMILY_MODELS = sorted(n for p in FAMILY_PATTERNS for n in timm.list_models(p))
REPLACEMENTS = (timm_attention.SwinWindowAttention, timm_attention.TinyVitAttention,
                timm_attention.EfficientFormerAttention, timm_attention.EfficientVitCascadedAttention,
                timm_attention.EfficientFormerV2Downsample)
SUBSET = ["swin_tiny_patch4_window7_224", "tiny_vit_5m_224", "efficientformer_l1", "efficientvit_m0",
          "efficientformerv2_s0"]
SECOND_SIZE_SUBSET = ["swin_tiny_patch4_window7_224", "efficientvit_m0"]
ERROR_RATIO = 2.0
TENSOR_RATIO = 20.0
FLOOR = 1e-6


def second_size(name):
    """Another input size timm runs: non-square where the model allows it. EfficientFormer's
    attention is built for 7x7 tokens, so its second size keeps that last grid (208x200 -> 7x7)."""
    if name.startswith("efficientformer_l"):
        return (208, 200)
    height, width = timm.create_model(name, pretrained=False, device="meta").pretrained_cfg["input_size"][1:]
    return (height - 64, width + 32)


def create(name, size=None):
    """The model for `size` (Swin, EfficientViT and EfficientFormerV2 take img_size; TinyViT and
    EfficientFormer run other sizes as built)."""
    kwargs = {}
    if size is not None and name.startswith(("swin", "efficientvit", "efficientformerv2")):
        kwargs["img_size"] = size
    return timm.create_model(name, pretrained=False, **kwargs)


def randomize_family_(model: nn.Module, seed: int = 0) -> nn.Module:
    """randomize_ (bias tables, BatchNorms), plus Swin's tables, layer scales, norms and biases."""
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(2.0 * torch.randn(p.shape, generator=gen))
            elif name.endswith("gamma"):  # layer scale, 1e-5 at init
                p.copy_(0.5 * (1 + 0.1 * torch.randn(p.shape, generator=gen)))
            elif name.endswith("bias") and not name.endswith("attention_biases") and bool((p == 0).all()):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def rms_error(got, oracle):
    return ((got.double() - oracle).norm() / max(1, oracle.numel()) ** 0.5).item()


def rms(t):
    return (t.double().norm() / max(1, t.numel()) ** 0.5).item()


def check_parity(name, size):
    torch.manual_seed(0)
    ref = randomize_family_(create(name, size if size != "default" else None)).eval()
    ours = patch_timm(copy.deepcopy(ref))
    oracle = copy.deepcopy(ref).double()
    assert ours.fastvit_kernels_report.num_replaced > 0
    if size == "default":
        size = ref.pretrained_cfg["input_size"][1:]
    x = image(size, batch=2)
    grad = None
    results = {}
    for label, model in (("oracle", oracle), ("timm", ref), ("ours", ours)):
        out = model(x.to(next(model.parameters()).dtype))
        if grad is None:
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out.backward(grad.to(out.dtype))
        results[label] = {"output": out.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    missing = [n for n, g in results["ours"].items() if g is None and results["timm"][n] is not None]
    assert not missing, f"no gradient for {missing}"
    # Errors relative to each tensor's RMS (floored at the median RMS of the gradients: some are
    # zero in exact arithmetic, e.g. the key bias of a softmax, and hold only rounding noise).
    floor = sorted(rms(g) for g in results["oracle"].values() if g is not None)[len(results["oracle"]) // 2]
    relative = {"timm": {}, "ours": {}}
    for key, want in results["oracle"].items():
        if want is None:
            continue
        scale = rms(want) if key == "output" else max(rms(want), floor)
        for label in relative:
            relative[label][key] = rms_error(results[label][key], want) / scale
    out_ours, out_timm = relative["ours"].pop("output"), relative["timm"].pop("output")
    assert out_ours <= ERROR_RATIO * out_timm + FLOOR, f"{name} output: error {out_ours:.3g} vs timm's {out_timm:.3g}"
    # The gradients as a whole (RMS over tensors of their relative errors) within ERROR_RATIO x
    # timm's; single tensors, whose few elements make the ratio noisy (measured 0.3x..8x either
    # way with equally accurate kernels), within TENSOR_RATIO x (a wrong gradient is off by ~1).
    total = {label: (sum(e * e for e in errs.values()) / len(errs)) ** 0.5 for label, errs in relative.items()}
    assert total["ours"] <= ERROR_RATIO * total["timm"], (
        f"{name} gradients: RMS relative error {total['ours']:.3g} > {ERROR_RATIO} x timm's {total['timm']:.3g}")
    for key, ours_error in relative["ours"].items():
        timm_error = relative["timm"][key]
        assert ours_error <= TENSOR_RATIO * timm_error + FLOOR, (
            f"{name} {key}: relative error {ours_error:.3g} > {TENSOR_RATIO} x timm's {timm_error:.3g}")
    return ref, ours


def subset_or_sweep(names, subset):
    return [n if n in subset else pytest.param(n, marks=pytest.mark.sweep) for n in names]


# ---------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------


def test_supported_models_cover_the_families():
    names = set(supported_timm_models())
    assert set(FAMILY_MODELS) <= names
    assert set(timm.list_models("levit*")) <= names


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_patch_replaces_every_fitting_attention(name):
    """Built on the meta device (instant): every registered timm class is replaced; what is left
    is exactly the report's `left_alone`."""
    model = timm.create_model(name, pretrained=False, device="meta")
    timm_classes = tuple(registry.mapping())
    before = sum(isinstance(m, timm_classes) for m in model.modules())
    assert before > 0
    patch_timm(model)
    assert not any(type(m) in timm_classes for m in model.modules())
    assert sum(isinstance(m, REPLACEMENTS) for m in model.modules()) == before
    report = model.fastvit_kernels_report
    assert report.num_replaced == before
    if name.startswith("efficientformerv2"):
        (count, why), = report.left_alone.values()
        assert "efficientformer_v2.Attention2d" in report.left_alone and count > 0 and "talking heads" in why
        assert "left" in str(report) and "Attention2d alone" in str(report)
    else:
        assert report.left_alone == {}


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swinv2_cr_tiny_224"])
def test_swin_v2_is_left_alone_with_a_reason(name):
    model = timm.create_model(name, pretrained=False, device="meta")
    patch_timm(model)
    report = model.fastvit_kernels_report
    assert report.num_replaced == 0
    (count, why), = report.left_alone.values()
    assert count > 0 and "cosine attention" in why
    assert "cosine attention" in str(report)


# ---------------------------------------------------------------------------------------------
# Parity with the float64 oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", subset_or_sweep(FAMILY_MODELS, SUBSET))
def test_parity_default_size(name):
    check_parity(name, "default")


@pytest.mark.parametrize("name", subset_or_sweep(FAMILY_MODELS, SECOND_SIZE_SUBSET))
def test_parity_second_size(name):
    check_parity(name, second_size(name))


def test_swin_shifted_blocks_pass_their_mask(monkeypatch):
    """Swin's shifted blocks hand the op their mask (W = windows per image); the others none."""
    calls = []
    real = timm_attention.bias_attention
    monkeypatch.setattr(timm_attention, "bias_attention",
                        lambda *a, **kw: calls.append(kw["mask"]) or real(*a, **kw))
    torch.manual_seed(0)
    model = patch_timm(randomize_family_(create("swin_tiny_patch4_window7_224")).eval())
    with torch.no_grad():
        model(image((224, 224), batch=2))
    windows = [m.shape[0] if m is not None else None for m in calls]
    # stages of depth 2, 2, 6, 2: every second block shifted, except the last stage (one 7x7 window)
    assert windows == [None, 64, None, 16, None, 4, None, 4, None, 4, None, None]


def test_swin_attention_dropout_in_training_runs_timms_formula():
    torch.manual_seed(0)
    timm_module = timm.models.swin_transformer.WindowAttention(32, 2, window_size=4, attn_drop=0.5)
    ours = timm_attention.SwinWindowAttention.from_timm(copy.deepcopy(timm_module))
    x = torch.randn(4, 16, 32)
    mask = torch.zeros(2, 16, 16)
    mask[1, :8, 8:] = -100
    for module in (timm_module, ours):
        module.train()
    torch.manual_seed(1)
    expected = timm_module(x, mask)
    torch.manual_seed(1)
    got = ours(x, mask)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# Unpatch, state_dict, bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SUBSET)
def test_unpatch_restores_timm_and_state_dicts_match(name):
    torch.manual_seed(0)
    model = randomize_family_(create(name)).eval()
    timm_classes = {type(m) for m in model.modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patch_timm(model)
    assert model.state_dict().keys() == state.keys()
    fresh = create(name)
    fresh.load_state_dict(model.state_dict(), strict=True)
    unpatch_timm(model)
    assert {type(m) for m in model.modules()} == timm_classes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_from_timm_rejects_another_class():
    module = timm.models.tiny_vit.Attention(32, 8, num_heads=2, resolution=(3, 3))
    with pytest.raises(TypeError, match="SwinWindowAttention.from_timm expects a timm.models.swin_transformer.WindowAttention"):
        timm_attention.SwinWindowAttention.from_timm(module)
