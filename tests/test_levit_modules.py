"""BiasAttention / ShrinkAttention against timm's levit.Attention / levit.AttentionDownsample.

Everything in float32 with random weights (BatchNorm statistics and affine parameters, and the
attention bias table, re-drawn so that none is zero and the bias matters), in both layouts
(linear [B, N, C] and conv [B, C, H, W]), square, non-square and odd token grids, train and eval.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastvit_kernels.modules.bias_attention as module_file
from fastvit_kernels.modules import BiasAttention, ShrinkAttention

levit = pytest.importorskip("timm.models.levit")

# Until the C++ kernel is built the op runs on the reference and warns once about it.
pytestmark = pytest.mark.filterwarnings("ignore:fastvit_kernels. the native CPU kernels:RuntimeWarning")

RTOL = 1e-5  # max |error| relative to the largest |reference| value, per tensor


def randomize_(module: nn.Module, bias_std: float = 3.0, seed: int = 0) -> nn.Module:
    """Non-trivial weights: BN affine and running statistics, and the bias table, all non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=gen) * bias_std)
            elif name.endswith("bn.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bn.bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=gen))
    return module


def grid(resolution):
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


def make_input(resolution, channels, use_conv, batch=2, seed=1):
    r0, r1 = grid(resolution)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, r0, r1) if use_conv else (batch, r0 * r1, channels)
    return torch.randn(shape, generator=gen)


def assert_close(name, got, ref, rtol=RTOL):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref.abs().max().item() or 1.0
    error = (got - ref).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol:g} * {scale:.3g}"


def run_and_compare(timm_module, ours, x, training, rtol=RTOL, call=None):
    """Same forward output, and the same gradients for the input and every parameter.
    call: what runs `ours` (e.g. its torch.compile'd wrapper); `ours` by default."""
    timm_module.train(training)
    ours.train(training)
    x_timm = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    ref = timm_module(x_timm)
    out = (ours if call is None else call)(x_ours)
    assert_close("output", out, ref, rtol)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    ref.backward(grad_out)
    out.backward(grad_out)
    assert_close("grad input", x_ours.grad, x_timm.grad, rtol)
    ours_params = dict(ours.named_parameters())
    timm_params = dict(timm_module.named_parameters())
    assert ours_params.keys() == timm_params.keys()
    for name, p in timm_params.items():
        assert p.grad is not None and ours_params[name].grad is not None, name
        assert_close(f"grad {name}", ours_params[name].grad, p.grad, rtol)
    if training:  # BatchNorm running statistics were updated the same way
        ours_buffers = dict(ours.named_buffers())
        for name, b in timm_module.named_buffers():
            if b.is_floating_point():
                assert_close(f"buffer {name}", ours_buffers[name], b, rtol)


RESOLUTIONS = [pytest.param((7, 5), id="7x5"), pytest.param((14, 10), id="14x10"), pytest.param(7, id="7")]
LAYOUTS = [pytest.param(False, id="linear"), pytest.param(True, id="conv")]
ACTS = [pytest.param(nn.Hardswish, id="hardswish"), pytest.param(nn.SiLU, id="silu")]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


# ---------------------------------------------------------------------------------------------
# Equivalence with timm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("use_conv", LAYOUTS)
def test_attention_matches_timm(use_conv, resolution, act, training):
    torch.manual_seed(0)
    dim, key_dim, heads = 48, 8, 3
    ref = randomize_(levit.Attention(dim, key_dim, heads, attn_ratio=2.0, resolution=resolution,
                                     use_conv=use_conv, act_layer=act))
    ours = BiasAttention(dim, key_dim, heads, attn_ratio=2.0, resolution=resolution, use_conv=use_conv, act_layer=act)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(ours.attention_bias_idxs, ref.attention_bias_idxs)
    run_and_compare(ref, ours, make_input(resolution, dim, use_conv), training)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("use_pool", [pytest.param(False, id="subsample"), pytest.param(True, id="pool")])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("use_conv", LAYOUTS)
def test_shrink_attention_matches_timm(use_conv, resolution, use_pool, act, training):
    torch.manual_seed(0)
    in_dim, out_dim, key_dim = 32, 48, 8
    heads = in_dim // key_dim
    kwargs = dict(key_dim=key_dim, num_heads=heads, attn_ratio=4.0, resolution=resolution,
                  use_conv=use_conv, use_pool=use_pool, act_layer=act)
    ref = randomize_(levit.AttentionDownsample(in_dim, out_dim, **kwargs))
    ours = ShrinkAttention(in_dim, out_dim, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(ours.attention_bias_idxs, ref.attention_bias_idxs)
    x = make_input(resolution, in_dim, use_conv)
    r0, r1 = grid(resolution)
    q0, q1 = (r0 + 1) // 2, (r1 + 1) // 2  # 7 -> 4, 5 -> 3, 14 -> 7, 10 -> 5
    expected = (2, out_dim, q0, q1) if use_conv else (2, q0 * q1, out_dim)
    ref.eval()  # leaves the BatchNorm statistics alone (timm's train()/eval() return None)
    with torch.no_grad():
        assert ref(x).shape == expected
    assert ours.query_resolution == (q0, q1)
    run_and_compare(ref, ours, x, training)


@pytest.mark.parametrize("cls_pair", ["attention", "shrink"])
def test_float64_matches_timm_exactly(cls_pair):
    """dtype= in the constructor; in float64 both compute the same math to ~1e-12."""
    if cls_pair == "attention":
        args = dict(dim=32, key_dim=8, num_heads=2, attn_ratio=2.0, resolution=(5, 6), act_layer=nn.Hardswish)
        ref, ours = levit.Attention(**args, dtype=torch.float64), BiasAttention(**args, dtype=torch.float64)
        x = torch.randn(2, 30, 32, dtype=torch.float64)
    else:
        args = dict(in_dim=32, out_dim=40, key_dim=8, num_heads=4, resolution=(5, 6), act_layer=nn.Hardswish)
        ref, ours = levit.AttentionDownsample(**args, dtype=torch.float64), ShrinkAttention(**args, dtype=torch.float64)
        x = torch.randn(2, 30, 32, dtype=torch.float64)
    randomize_(ref)
    assert ours.attention_biases.dtype == torch.float64 and ours.attention_bias_idxs.dtype == torch.long
    ours.load_state_dict(ref.state_dict())
    run_and_compare(ref, ours, x, training=True, rtol=1e-12)


def test_meta_device_construction():
    ours = BiasAttention(64, 16, 4, resolution=(7, 5), device="meta")
    assert all(p.device.type == "meta" for p in ours.parameters())
    ours = ours.to_empty(device="cpu")
    ours.init_non_persistent_buffers()
    ref = levit.Attention(64, 16, 4, resolution=(7, 5))
    assert torch.equal(ours.attention_bias_idxs, ref.attention_bias_idxs)


def test_bias_index_formula():
    """docs/bias_attention.md, "Index rules used by the models": |y_i − y_j|·R1 + |x_i − x_j|, and |s·qy_i − ky_j|·R1 + |s·qx_i − kx_j| for shrink."""
    r0, r1 = 5, 4
    idx = BiasAttention(16, 4, 2, resolution=(r0, r1)).attention_bias_idxs
    for i in range(r0 * r1):
        for j in range(r0 * r1):
            assert idx[i, j] == abs(i // r1 - j // r1) * r1 + abs(i % r1 - j % r1)
    shrink = ShrinkAttention(16, 16, 4, 4, resolution=(r0, r1))
    q1 = (r1 + 1) // 2
    for i in range(shrink.attention_bias_idxs.shape[0]):
        for j in range(r0 * r1):
            expected = abs(2 * (i // q1) - j // r1) * r1 + abs(2 * (i % q1) - j % r1)
            assert shrink.attention_bias_idxs[i, j] == expected


# ---------------------------------------------------------------------------------------------
# state_dict, from_timm / to_timm
# ---------------------------------------------------------------------------------------------


def _pairs(use_conv):
    yield (levit.Attention(32, 8, 2, resolution=(4, 6), use_conv=use_conv),
           BiasAttention(32, 8, 2, resolution=(4, 6), use_conv=use_conv))
    yield (levit.AttentionDownsample(32, 48, 8, 4, resolution=(5, 6), use_conv=use_conv, use_pool=True),
           ShrinkAttention(32, 48, 8, 4, resolution=(5, 6), use_conv=use_conv, use_pool=True))


@pytest.mark.parametrize("use_conv", LAYOUTS)
def test_state_dict_loads_strictly_both_ways(use_conv):
    for ref, ours in _pairs(use_conv):
        randomize_(ref)
        assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
        assert "attention_bias_idxs" not in ours.state_dict()  # non-persistent, as in timm
        ours.load_state_dict(ref.state_dict(), strict=True)
        randomize_(ours, seed=3)
        fresh = copy.deepcopy(ref)  # a second timm module to load ours into
        fresh.load_state_dict(ours.state_dict(), strict=True)
        for key, value in ours.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("use_conv", LAYOUTS)
def test_from_timm_shares_tensors_and_to_timm_reverses(use_conv):
    for ref, _ in _pairs(use_conv):
        randomize_(ref)
        cls = BiasAttention if type(ref) is levit.Attention else ShrinkAttention
        ref.eval()
        ours = cls.from_timm(ref)
        assert type(ours) is cls and not ours.training
        for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n1 == n2 and p1 is p2
        for (n1, b1), (n2, b2) in zip(ref.named_buffers(), ours.named_buffers()):
            assert n1 == n2 and b1 is b2
        assert ours.qkv is ref.qkv if cls is BiasAttention else ours.kv is ref.kv
        assert "attention_bias_idxs" in ours._non_persistent_buffers_set
        x = make_input(ref.resolution, 32, use_conv)
        with torch.no_grad():
            expected = ref(x)
            assert_close("from_timm output", ours(x), expected)
            back = ours.to_timm()
            assert type(back) is type(ref)
            assert all(p1 is p2 for p1, p2 in zip(back.parameters(), ref.parameters()))
            assert_close("to_timm output", back(x), expected)
        # a new parameter registered on one module does not appear on the other
        ours.register_parameter("extra", nn.Parameter(torch.zeros(1)))
        assert "extra" not in dict(ref.named_parameters())


def test_from_timm_rejects_other_types():
    with pytest.raises(TypeError, match="levit.Attention"):
        BiasAttention.from_timm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="AttentionDownsample"):
        ShrinkAttention.from_timm(levit.Attention(16, 4, 2, resolution=3))


def test_wrong_token_count_is_a_clear_error():
    m = BiasAttention(16, 4, 2, resolution=(4, 4))
    with pytest.raises(ValueError, match="4x4 token grid"):
        m(torch.randn(1, 12, 16))


# ---------------------------------------------------------------------------------------------
# Bias cache, activation fusion, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BiasAttention, ShrinkAttention])
def test_bias_cache_semantics(cls):
    m = cls(16, 4, 2, resolution=(4, 3)) if cls is BiasAttention else cls(16, 16, 4, 4, resolution=(4, 3))
    randomize_(m)
    dense = m.attention_biases[:, m.attention_bias_idxs]
    m.train()
    assert torch.equal(m.get_attention_biases(torch.device("cpu")), dense)
    assert m.attention_bias_cache == {}  # no caching in training mode
    m.eval()
    cached = m.get_attention_biases(torch.device("cpu"))
    assert list(m.attention_bias_cache) == ["cpu"] and torch.equal(cached, dense)
    assert m.get_attention_biases(torch.device("cpu")) is cached
    m.train()
    assert m.attention_bias_cache == {}
    m.eval()
    m.get_attention_biases(torch.device("cpu"))
    m.to(torch.float64)
    assert m.attention_bias_cache == {}
    m.get_attention_biases(torch.device("cpu"))
    m.to("cpu")
    assert m.attention_bias_cache == {}
    assert m.train() is m


def test_forward_sees_bias_edits_in_eval():
    """forward gathers from attention_biases on every call (no stale eval cache)."""
    m = randomize_(BiasAttention(16, 4, 2, resolution=(3, 3), act_layer=nn.Hardswish)).eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        before = m(x)
        m.attention_biases.add_(torch.randn_like(m.attention_biases))
        after = m(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("act,expected", [(nn.Hardswish, "hardswish"), (nn.SiLU, None), (nn.GELU, None)])
def test_hardswish_is_fused_into_the_op(monkeypatch, act, expected):
    calls = []
    real = module_file.bias_attention

    def spy(*args, **kwargs):
        calls.append(kwargs["activation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module_file, "bias_attention", spy)
    ref = randomize_(levit.Attention(16, 4, 2, attn_ratio=2, resolution=3, act_layer=act))
    ours = BiasAttention.from_timm(copy.deepcopy(ref))
    x = torch.randn(2, 9, 16)
    assert_close("output", ours(x), ref(x))
    assert calls == [expected]


@pytest.mark.parametrize("use_conv", LAYOUTS)
def test_compiles_without_graph_breaks(use_conv):
    """fullgraph=True fails on any graph break; aot_eager also traces the backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    for ref_cls, cls, args, res in (
        (levit.Attention, BiasAttention, dict(dim=32, key_dim=8, num_heads=2, attn_ratio=2.0), (5, 4)),
        (levit.AttentionDownsample, ShrinkAttention, dict(in_dim=32, out_dim=32, key_dim=8, num_heads=4), (5, 4)),
    ):
        ref = randomize_(ref_cls(**args, resolution=res, use_conv=use_conv, act_layer=nn.Hardswish))
        ours = cls.from_timm(copy.deepcopy(ref))
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        x = make_input(res, 32, use_conv)
        for training in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_and_compare(ref, ours, x, training, call=compiled)
                ours.zero_grad()
                ref.zero_grad()
