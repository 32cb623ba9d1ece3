"""patch_timm / unpatch_timm / fold_batchnorm on whole timm LeViT models.

Models get random weights (BatchNorm statistics and affine parameters, and every attention bias
table, re-drawn non-zero) so that the attention branch and its bias matter; timm's own init zeroes
both the bias tables and the BatchNorm weight after each attention, which would hide errors.

Tolerances (float32): outputs 1e-5 of the largest |output|; gradients RMS error <= 1e-4 of the
tensor's RMS (with a floor, see assert_all_close). Measured: ~1e-6 for outputs and 2e-6..1e-5
for gradients on every variant. Two things make whole-model float32 comparisons meaningless and
are avoided on purpose: weights under which training is chaotic (see randomize_) and the
classifier head's BatchNorm in training mode with batch 2 (see train_mode). A Hardswish input
that lands within rounding of ±3 (where its derivative jumps) can still, rarely, move a gradient
by ~1e-3: if a new kernel trips that, check with another seed before suspecting the kernel.

Cost: this machine has 2 cores. Every `levit*` variant is compared at 224×224 (batch 2, training
mode, output and every parameter gradient); the second input size (a non-square, odd token grid)
runs on a representative subset: linear and conv layouts, Hardswish and SiLU, stride-16 and
stride-8 stems (about 4 min of CPU time for this file). The second size on every variant is
marked `sweep` (run with `-m sweep`).
"""

import copy

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.models import levit  # noqa: E402

import fastvit_kernels  # noqa: E402
from fastvit_kernels import patch as fvk_patch  # noqa: E402
from fastvit_kernels.modules import BiasAttention, ShrinkAttention  # noqa: E402
from fastvit_kernels.patch import (  # noqa: E402
    FoldedBatchNormWarning,
    PatchReport,
    fold_batchnorm,
    patch_timm,
    registry,
    supported_timm_models,
    unpatch_timm,
)

pytestmark = pytest.mark.filterwarnings("ignore:fastvit_kernels. the native CPU kernels:RuntimeWarning")

TIMM_CLASSES = (levit.Attention, levit.AttentionDownsample)
ALL_MODELS = timm.list_models("levit*")
# Second size: 176×112 gives token grids 11×7 → 6×4 → 3×2 with the stride-16 stem (odd and
# non-square at every stage) and 22×14 → 11×7 → 6×4 with the stride-8 stem.
SECOND_SIZE = (176, 112)
SECOND_SIZE_SUBSET = ["levit_128s", "levit_conv_128s", "levit_256d", "levit_conv_384_s8"]

OUT_RTOL = 1e-5  # max |error| / max |reference|
GRAD_RTOL = 1e-4  # RMS error / RMS of the reference gradient (see assert_grads_close)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-zero attention bias tables (std 2) and BatchNorm parameters and statistics.

    The BatchNorms that timm zero-initialises (the last one of each residual branch) get weights
    ~0.25: with ~1 the residual stream of these deep models grows so much that float32 training
    becomes chaotic (timm's own float32 and float64 runs diverge within one SGD step), which
    would make any comparison meaningless."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(2.0 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bn.weight"):
                base = 0.25 if bool((p == 0).all()) else 1.0
                p.copy_(base * (1 + 0.1 * torch.randn(p.shape, generator=gen)))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    assert all(bool((p != 0).any()) for n, p in model.named_parameters() if "attention_biases" in n)
    return model


def assert_close(name, got, ref, rtol):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() or 1.0
    error = (got - ref).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol:g} * {scale:.3g}"


def rms(t: torch.Tensor) -> float:
    return (t.double().norm() / t.numel() ** 0.5).item()


def assert_all_close(what: str, got: dict, ref: dict, rtol: float) -> None:
    """For each tensor: RMS(error) <= rtol * max(RMS(reference), median RMS over the tensors).

    The floor matters for gradients that are zero in exact arithmetic (e.g. the bias of a
    residual branch's last BatchNorm when every consumer of the residual stream normalises with
    batch statistics), where both float32 results are rounding noise."""
    assert got.keys() == ref.keys()
    missing = [n for n in ref if got[n] is None or ref[n] is None]
    assert not missing, f"no {what} for {missing}"
    floor = sorted(rms(t) for t in ref.values())[len(ref) // 2]
    for name, t_ref in ref.items():
        error, scale = rms(got[name] - t_ref), max(rms(t_ref), floor)
        assert error <= rtol * scale, f"{what} {name}: RMS error {error:.3g} > {rtol:g} * {scale:.3g}"


def assert_grads_close(ours: nn.Module, ref: nn.Module, rtol: float = GRAD_RTOL) -> None:
    assert_all_close(
        "grad", {n: p.grad for n, p in ours.named_parameters()}, {n: p.grad for n, p in ref.named_parameters()}, rtol
    )


def count_types(model):
    counts = {}
    for m in model.modules():
        counts[type(m)] = counts.get(type(m), 0) + 1
    return counts


def image(size, batch=2, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def train_mode(model: nn.Module) -> None:
    """Training mode, except the classifier heads' BatchNorm (timm NormLinear): with batch 2 it
    normalises each feature over 2 values, whose gradient is ill-conditioned float32 noise."""
    model.train()
    for m in model.modules():
        if isinstance(m, levit.NormLinear):
            m.eval()


def compare_train_step(ref, ours, x):
    """Training-mode forward and backward: same output, same gradient for every parameter."""
    train_mode(ref)
    train_mode(ours)
    out_ref = ref(x)
    out = ours(x)
    assert_close("output", out, out_ref, OUT_RTOL)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2))
    out_ref.backward(grad)
    out.backward(grad)
    assert_grads_close(ours, ref)


def build_pair(name, **kwargs):
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, pretrained=False, **kwargs))
    ours = patch_timm(copy.deepcopy(ref))
    return ref, ours


# ---------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------


def test_supported_models_include_every_levit():
    names = [n for n in supported_timm_models() if n.startswith("levit")]
    assert names == sorted(timm.list_models("levit*"))
    assert len([n for n in names if n.startswith("levit_conv_")]) == 10
    assert len([n for n in names if not n.startswith("levit_conv_")]) == 10


@pytest.mark.parametrize("name", ALL_MODELS)
def test_patch_replaces_every_attention(name):
    """Built on the meta device (instant): after patching no timm attention class is left."""
    model = timm.create_model(name, pretrained=False, device="meta")
    before = count_types(model)
    n_attn, n_down = before.get(levit.Attention, 0), before.get(levit.AttentionDownsample, 0)
    assert n_attn > 0 and n_down == 2
    assert patch_timm(model) is model
    after = count_types(model)
    assert not any(isinstance(m, TIMM_CLASSES) for m in model.modules())
    assert after.get(BiasAttention, 0) == n_attn and after.get(ShrinkAttention, 0) == n_down
    report = model.fastvit_kernels_report
    assert report.replaced == {
        "levit.Attention -> BiasAttention": n_attn,
        "levit.AttentionDownsample -> ShrinkAttention": n_down,
    }
    assert report.num_replaced == n_attn + n_down and report.folded_batchnorms == 0


# ---------------------------------------------------------------------------------------------
# Patched vs unpatched, every variant
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_patched_matches_timm_224(name):
    ref, ours = build_pair(name)
    compare_train_step(ref, ours, image((224, 224)))


@pytest.mark.parametrize(
    "name", [n if n in SECOND_SIZE_SUBSET else pytest.param(n, marks=pytest.mark.sweep) for n in ALL_MODELS])
def test_patched_matches_timm_non_square(name):
    ref, ours = build_pair(name, img_size=SECOND_SIZE)
    x = image(SECOND_SIZE)
    compare_train_step(ref, ours, x)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        assert_close("eval output", ours(x), ref(x), OUT_RTOL)


# SiLU variants (levit_*d, levit_512*, *_s8) at 112×112 (grids 7×7 → 4×4 → 2×2, s8: 14×14 → 7×7
# → 4×4): every attention runs SiLU inside the op.
SILU_MODELS = ["levit_256d", "levit_conv_384_s8"]


@pytest.mark.parametrize("name", SILU_MODELS)
def test_silu_models_fuse_silu(monkeypatch, name):
    from fastvit_kernels.modules import bias_attention as module_file

    calls = []
    real = module_file.bias_attention
    monkeypatch.setattr(module_file, "bias_attention",
                        lambda *a, **kw: calls.append(kw["activation"]) or real(*a, **kw))
    # randomize_ re-draws the BatchNorm after each attention, which timm zero-initialises (with
    # it at 0 no gradient would flow back through the attention and its SiLU).
    ref, ours = build_pair(name, img_size=112)
    n_attention = sum(isinstance(m, (BiasAttention, ShrinkAttention)) for m in ours.modules())
    assert all(type(m.proj.act) is nn.SiLU for m in ours.modules() if isinstance(m, (BiasAttention, ShrinkAttention)))
    compare_train_step(ref, ours, image((112, 112)))
    assert calls == ["silu"] * n_attention


@pytest.mark.parametrize("name", SILU_MODELS)
def test_silu_models_fold_batchnorm(monkeypatch, name):
    """Folded and patched, a SiLU model still fuses SiLU and keeps its outputs."""
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, pretrained=False, img_size=112)).eval()
    x = image((112, 112))
    with torch.no_grad():
        expected = ref(x)
    folded = patch_timm(copy.deepcopy(ref), fold_bn=True)
    assert num_batchnorms(folded) == 0
    from fastvit_kernels.modules import bias_attention as module_file

    calls = []
    real = module_file.bias_attention
    monkeypatch.setattr(module_file, "bias_attention",
                        lambda *a, **kw: calls.append(kw["activation"]) or real(*a, **kw))
    with torch.no_grad():
        assert_close("patched+folded", folded(x), expected, 1e-5)
    assert calls and set(calls) == {"silu"}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_sgd_training_tracks_timm():
    """5 SGD steps (batch 4) on levit_128s, patched after the first one: an optimizer built
    before patching keeps working (parameters are shared, not copied); losses, parameters and
    momentum buffers track timm's; eval → train → eval agree (timm's eval bias cache must be
    cleared by train(), and ours must not hold stale biases)."""
    torch.manual_seed(0)
    ref = randomize_(timm.create_model("levit_128s", pretrained=False, num_classes=10))
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 224, 224, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    params_before = [id(p) for p in ours.parameters()]

    def step(model, opt):
        model.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    def compare_eval():
        ref.eval()
        ours.eval()
        with torch.no_grad():
            assert_close("eval logits", ours(x), ref(x), 1e-4)

    # one step unpatched (momentum buffers filled), then patch in place and go on
    assert step(ours, opt_ours) == step(ref, opt_ref)
    patch_timm(ours)
    assert [id(p) for p in ours.parameters()] == params_before
    compare_eval()  # fills timm's eval bias cache
    losses_ref, losses = [], []
    for _ in range(4):
        losses_ref.append(step(ref, opt_ref))
        losses.append(step(ours, opt_ours))
    for a, b in zip(losses, losses_ref):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, (losses, losses_ref)
    assert losses_ref[-1] < 0.9 * losses_ref[0]  # it did train
    compare_eval()
    ref_params = dict(ref.named_parameters())
    assert_all_close("param", {n: p.detach() for n, p in ours.named_parameters()},
                     {n: p.detach() for n, p in ref_params.items()}, 1e-4)
    # float32 rounding: timm's own momentum buffers are up to ~1e-3 (RMS) from a float64 run's
    assert_all_close("momentum", {n: opt_ours.state[p]["momentum_buffer"] for n, p in ours.named_parameters()},
                     {n: opt_ref.state[p]["momentum_buffer"] for n, p in ref_params.items()}, 5e-3)


def test_sgd_training_float64_is_exact():
    """In float64 (reference backend) patched and unpatched training agree to rounding."""
    torch.manual_seed(0)
    ref = randomize_(timm.create_model("levit_conv_128s", pretrained=False, num_classes=10, img_size=128))
    ref = ref.double()
    ours = patch_timm(copy.deepcopy(ref))
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (ref, ours)]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 128, 128, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)
    for _ in range(3):
        losses = []
        for model, opt in zip((ref, ours), opts):
            model.train()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-12 * abs(losses[0])
    assert_all_close("param", {n: p.detach() for n, p in ours.named_parameters()},
                     {n: p.detach() for n, p in ref.named_parameters()}, 1e-10)
    assert_all_close("momentum", {n: opts[1].state[p]["momentum_buffer"] for n, p in ours.named_parameters()},
                     {n: opts[0].state[p]["momentum_buffer"] for n, p in ref.named_parameters()}, 1e-9)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------


def num_batchnorms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_fold_batchnorm_keeps_outputs(name):
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(name, pretrained=False))
    ref.eval()
    x = image((224, 224))
    with torch.no_grad():
        expected = ref(x)
    n_bn = num_batchnorms(ref)
    assert n_bn > 0

    folded = patch_timm(copy.deepcopy(ref), fold_bn=True)  # patched and folded
    assert num_batchnorms(folded) == 0
    assert folded.fastvit_kernels_report.folded_batchnorms == n_bn
    assert "folded" in str(folded.fastvit_kernels_report)
    plain_folded = fold_batchnorm(copy.deepcopy(ref))  # folded without patching
    assert num_batchnorms(plain_folded) == 0
    with torch.no_grad():
        assert_close("patched+folded", folded(x), expected, 1e-5)
        assert_close("folded", plain_folded(x), expected, 1e-5)
    # The stem's convolutions + Hardswish became fused oneDNN convolutions (taken under no_grad);
    # with autograd on they fall back to Conv2d + Hardswish: same outputs either way.
    from fastvit_kernels.modules.conv_hardswish import ConvHardswish

    stem_convs = [m for m in folded.stem.modules() if isinstance(m, ConvHardswish)]
    assert len(stem_convs) == 4 and [m.hardswish for m in stem_convs] == [True, True, True, False]
    assert not any(isinstance(m, nn.Hardswish) for m in folded.stem.modules())
    assert_close("folded, autograd-enabled path", folded(x).detach(), expected, 1e-5)

    with pytest.warns(FoldedBatchNormWarning, match="cannot be undone"):
        unpatch_timm(folded)
    assert count_types(folded).get(levit.Attention, 0) == count_types(ref)[levit.Attention]
    with torch.no_grad():
        assert_close("unpatched folded", folded(x), expected, 1e-5)


def test_fold_batchnorm_needs_eval_mode():
    model = timm.create_model("levit_128s", pretrained=False, device="meta")
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        fold_batchnorm(model)
    with pytest.raises(RuntimeError, match="eval"):
        patch_timm(model, fold_bn=True)
    # nothing was changed by the failed calls
    assert any(type(m) is levit.Attention for m in model.modules())
    assert num_batchnorms(model) > 0
    model.eval()
    model.stages[0].blocks[0].mlp.train()  # one submodule still training
    with pytest.raises(RuntimeError, match="stages.0.blocks.0.mlp"):
        fold_batchnorm(model)


# ---------------------------------------------------------------------------------------------
# Unpatch, idempotence, report, state_dict, errors
# ---------------------------------------------------------------------------------------------


def test_unpatch_restores_timm_and_outputs():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("levit_conv_128s", pretrained=False))
    model.eval()
    x = image((224, 224))
    with torch.no_grad():
        expected = model(x)
    params = [id(p) for p in model.parameters()]
    types_before = count_types(model)
    patch_timm(model)
    with torch.no_grad():
        assert_close("patched", model(x), expected, OUT_RTOL)
    assert unpatch_timm(model) is model
    assert count_types(model) == types_before
    assert [id(p) for p in model.parameters()] == params
    assert not hasattr(model, "fastvit_kernels_report")
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # timm's own code again, same tensors


def test_patching_twice_is_a_no_op(capsys):
    model = timm.create_model("levit_128s", pretrained=False, device="meta")
    patch_timm(model)
    modules = list(model.modules())
    report = patch_timm(model, verbose=True).fastvit_kernels_report
    assert list(model.modules()) == modules  # the very same module objects
    assert report.replaced == {} and report.num_replaced == 0
    assert report.already_patched == 11  # 9 Attention + 2 AttentionDownsample in levit_128s
    printed = capsys.readouterr().out
    assert "replaced no modules" in printed and "11 were already patched" in printed


def test_report_text(capsys):
    model = timm.create_model("levit_128s", pretrained=False, device="meta")
    patch_timm(model, verbose=True)
    report = model.fastvit_kernels_report
    assert isinstance(report, PatchReport)
    text = str(report)
    assert capsys.readouterr().out.strip() == text
    assert "replaced 11 modules" in text
    assert "9 levit.Attention -> BiasAttention" in text
    assert "2 levit.AttentionDownsample -> ShrinkAttention" in text
    assert "\n" not in text


def test_state_dict_round_trip():
    torch.manual_seed(0)
    ref = randomize_(timm.create_model("levit_128s", pretrained=False))
    patched = patch_timm(copy.deepcopy(ref))
    assert list(patched.state_dict().keys()) == list(ref.state_dict().keys())
    patched.load_state_dict(ref.state_dict(), strict=True)
    fresh = timm.create_model("levit_128s", pretrained=False)
    fresh.load_state_dict(patched.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_shared_module_is_replaced_once():
    attn = levit.Attention(16, 4, 2, resolution=3)
    model = nn.Sequential(attn, nn.Sequential(attn))
    patch_timm(model)
    assert type(model[0]) is BiasAttention and model[1][0] is model[0]
    assert model.fastvit_kernels_report.num_replaced == 1


def test_not_a_module_is_a_type_error():
    for fn in (patch_timm, unpatch_timm, fold_batchnorm):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            fn("levit_128s")


def test_registry():
    assert registry[levit.Attention] is BiasAttention
    assert registry[levit.AttentionDownsample] is ShrinkAttention
    assert set(TIMM_CLASSES) <= set(registry) and len(registry) == len(set(registry))
    entries = len(registry)
    assert registry.timm_class_for(BiasAttention(16, 4, 2, resolution=3)) is levit.Attention

    class NotAReplacement(nn.Module):
        pass

    with pytest.raises(TypeError, match="from_timm"):
        registry.register("timm.models.levit.LevitMlp", NotAReplacement)

    class FakeMlp(nn.Module):  # one registry line is all a new replacement needs
        @classmethod
        def from_timm(cls, module):
            new = cls()
            new.inner = module
            return new

        def to_timm(self):
            return self.inner

        def forward(self, x):
            return self.inner(x)

    registry.register("timm.models.levit.LevitMlp", FakeMlp)
    try:
        model = timm.create_model("levit_128s", pretrained=False, device="meta")
        patch_timm(model)
        assert model.fastvit_kernels_report.replaced["levit.LevitMlp -> FakeMlp"] == 11
        unpatch_timm(model)
        assert not any(type(m) is FakeMlp for m in model.modules())
    finally:
        registry.unregister("timm.models.levit.LevitMlp")
    assert len(registry) == entries


def test_package_exports():
    assert fastvit_kernels.patch_timm is patch_timm
    assert fastvit_kernels.unpatch_timm is unpatch_timm
    assert fastvit_kernels.fold_batchnorm is fold_batchnorm
    assert fastvit_kernels.BiasAttention is BiasAttention
    assert fastvit_kernels.ShrinkAttention is ShrinkAttention
    for name in ("BiasAttention", "ShrinkAttention", "patch_timm", "unpatch_timm", "fold_batchnorm"):
        assert name in fastvit_kernels.__all__
    assert fvk_patch.registry is registry
