"""MaskedTokenAttention against timm's ViT Attention and against DynamicViT's own attention.

The DynamicViT oracle below is an independent plain-PyTorch copy of raoyongming/DynamicViT's
`Attention` (`softmax_with_policy`, eps 1e-6). Inputs are fresh random tensors; the tests pass
whichever backend the ops run on (tolerances are those of float32 kernels in float32).
"""

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import fastvit_kernels
from fastvit_kernels import MaskedTokenAttention
from fastvit_kernels.modules import masked_token_attention as mta_module

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import Attention, Block  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}
HAS_GATED = "gated" in inspect.signature(Attention.__init__).parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster (and far faster on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DynamicViTAttention(nn.Module):
    """raoyongming/DynamicViT models/dyvit.py Attention, written out independently."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def softmax_with_policy(self, attn, policy, eps=1e-6):
        B, N, _ = policy.size()
        attn_policy = policy.reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, N, N)
        attn_policy = attn_policy + (1.0 - attn_policy) * eye
        max_att = torch.max(attn, dim=-1, keepdim=True)[0]
        attn = attn - max_att
        attn = attn.to(torch.float32 if attn.dtype != torch.float64 else attn.dtype).exp_() \
            * attn_policy.to(torch.float32 if attn.dtype != torch.float64 else attn.dtype)
        attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
        return attn.type_as(max_att)

    def forward(self, x, policy, attn_dropout=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1) if policy is None else self.softmax_with_policy(attn, policy)
        if attn_dropout is not None:
            attn = attn_dropout(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def _randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            shift = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norm gains near 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + shift)
    return module


def _timm_pair(dtype, dim=32, heads=4, seed=0, **kwargs):
    ref = _randomize(Attention(dim, num_heads=heads, qkv_bias=True, **kwargs), seed=seed).to(dtype)
    ours = MaskedTokenAttention.from_timm(ref)
    return ref, ours


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _policy(B, N, dtype, soft=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if soft:
        p = torch.rand(B, N, 1, generator=g, dtype=dtype)
    else:
        p = (torch.rand(B, N, 1, generator=g) > 0.4).to(dtype)
    p[:, 0] = 1.0
    return p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# plain path == timm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "qk_norm", "scale_norm", "gated"])
def test_plain_path_matches_timm(dtype, variant):
    kwargs = {}
    if variant in ("qk_norm", "scale_norm"):
        kwargs = {variant: True, "norm_layer": nn.LayerNorm}
    if variant == "gated":
        if not HAS_GATED:
            pytest.skip("this timm's Attention has no gate")
        kwargs = {"gated": True}
    ref, ours = _timm_pair(dtype, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 11, 32, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 11, 32, dtype=dtype)
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    params_ref, params = list(ref.parameters()), list(ours.parameters())
    g_ref = _grads((out_ref * dy).sum(), [x] + params_ref)
    g = _grads((out * dy).sum(), [x] + params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 7, 68, 197])
def test_plain_inference_runs_the_fused_kernel_within_timms_error(dtype, N, monkeypatch):
    """Without grad on CPU the plain path runs bias_attention (no bias) instead of SDPA: its
    error against float64 stays within twice timm's own in the same dtype (or the dtype's floor)."""
    ref, ours = _timm_pair(torch.float32, dim=384, heads=6)  # DeiT-S widths
    oracle = copy.deepcopy(ref).double()
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(2, N, 384)
    calls = []
    real = mta_module.bias_attention
    monkeypatch.setattr(mta_module, "bias_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = oracle(x.double())
        out_ref, out = ref(x.to(dtype)), ours(x.to(dtype))
    assert len(calls) == (1 if fastvit_kernels._native.available() else 0)
    floor = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype] * want.abs().max().item()
    err = (out.double() - want).abs().max().item()
    err_timm = (out_ref.double() - want).abs().max().item()
    assert err <= 2 * err_timm + floor, (err, err_timm)


def test_plain_path_attn_mask_and_causal_like_timm():
    ref, ours = _timm_pair(torch.float64)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    bool_mask = torch.rand(2, 1, 9, 9) > 0.3
    bool_mask |= torch.eye(9, dtype=torch.bool)
    float_mask = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    for kwargs in (dict(attn_mask=bool_mask), dict(attn_mask=float_mask), dict(is_causal=True)):
        torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs), **TOL[torch.float64])


def test_in_timm_block_and_state_dict():
    block_ref = Block(32, 4, qkv_bias=True)
    block = Block(32, 4, qkv_bias=True, attn_layer=MaskedTokenAttention)
    assert isinstance(block.attn, MaskedTokenAttention)
    assert list(block.state_dict()) == list(block_ref.state_dict())
    _randomize(block_ref, std=0.2)
    block.load_state_dict(block_ref.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(block(x), block_ref(x), **TOL[torch.float32])


def test_from_timm_copies():
    ref = _randomize(Attention(48, num_heads=3, qkv_bias=False, qk_norm=True, norm_layer=nn.LayerNorm,
                               attn_drop=0.1, proj_drop=0.2)).double().eval()
    ours = MaskedTokenAttention.from_timm(ref)
    assert (ours.num_heads, ours.head_dim, ours.attn_dim, ours.dim) == (3, 16, 48, 48)
    assert ours.qkv.bias is None and ours.attn_drop.p == 0.1 and ours.proj_drop.p == 0.2
    assert not ours.training and ours.qkv.weight.dtype == torch.float64
    assert isinstance(ours.q_norm, nn.LayerNorm)
    assert ours.qkv.weight.data_ptr() != ref.qkv.weight.data_ptr()  # a copy, not shared
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(TypeError, match="from_timm"):
        MaskedTokenAttention.from_timm(nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------
# policy path == DynamicViT's softmax_with_policy attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("policy_rank", [2, 3])
def test_policy_path_matches_dynamicvit(dtype, soft, policy_rank):
    B, N, C, H = 3, 13, 32, 4
    ours = _randomize(MaskedTokenAttention(C, num_heads=H, qkv_bias=True), seed=3).to(dtype)
    ref = DynamicViTAttention(C, num_heads=H, qkv_bias=True).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, N, C, dtype=dtype)
    policy = _policy(B, N, dtype, soft=soft)
    p_in = policy if policy_rank == 3 else policy.reshape(B, N)
    out = ours(x, policy=p_in)
    out_ref = ref(x, policy)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    g = _grads((out * dy).sum(), [x, ours.qkv.weight, ours.qkv.bias, ours.proj.weight, policy])
    g_ref = _grads((out_ref * dy).sum(), [x, ref.qkv.weight, ref.qkv.bias, ref.proj.weight, policy])
    for name, a, b in zip(["x", "qkv.weight", "qkv.bias", "proj.weight", "policy"], g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_policy_all_ones_is_not_plain_softmax_but_close():
    # DynamicViT passes an all-ones policy before its first pruning stage: softmax_with_policy,
    # which is within ~eps of the softmax (and not equal to it).
    ours = _randomize(MaskedTokenAttention(32, num_heads=4, qkv_bias=True)).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    ones = torch.ones(2, 10, dtype=torch.float64)
    a, b = ours(x, policy=ones), ours(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.equal(a, b)


def test_policy_attn_drop_falls_back_to_eager_with_dropout():
    B, N, C, H = 2, 9, 32, 4
    ours = _randomize(MaskedTokenAttention(C, num_heads=H, qkv_bias=True, attn_drop=0.5)).double()
    ref = DynamicViTAttention(C, num_heads=H, qkv_bias=True).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(B, N, C, dtype=torch.float64)
    policy = _policy(B, N, torch.float64).detach()
    ours.train()
    torch.manual_seed(123)
    a = ours(x, policy=policy)
    torch.manual_seed(123)
    b = ref(x, policy, attn_dropout=nn.Dropout(0.5))
    torch.testing.assert_close(a, b, **TOL[torch.float64])
    ours.eval()  # no dropout in eval: the fused op
    torch.testing.assert_close(ours(x, policy=policy), ref(x, policy), **TOL[torch.float64])


def test_qkv_views_are_not_copied(monkeypatch):
    seen = {}
    real_policy, real_varlen = mta_module.policy_attention, mta_module.varlen_attention

    def spy_policy(q, k, v, policy, **kw):
        seen["policy"] = (q, k, v)
        out = real_policy(q, k, v, policy, **kw)
        assert out.transpose(1, 2).is_contiguous()  # the reshape to [B, N, C] is free
        return out

    def spy_varlen(q, k, v, cu, m, **kw):
        seen["varlen"] = (q, k, v)
        return real_varlen(q, k, v, cu, m, **kw)

    monkeypatch.setattr(mta_module, "policy_attention", spy_policy)
    monkeypatch.setattr(mta_module, "varlen_attention", spy_varlen)
    attn = MaskedTokenAttention(32, num_heads=4, qkv_bias=True)
    attn(torch.randn(2, 5, 32), policy=torch.ones(2, 5))
    attn(torch.randn(9, 32), cu_seqlens=torch.tensor([0, 4, 9]), max_seqlen=5)
    for key in ("policy", "varlen"):
        q, k, v = seen[key]
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert k.data_ptr() - q.data_ptr() == 32 * q.element_size()  # offsets in one qkv row


# ---------------------------------------------------------------------------------------------
# varlen path == timm attention image by image
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_varlen_path_matches_timm_per_image(dtype, cu_dtype):
    ref, ours = _timm_pair(dtype, seed=5)
    lengths = [5, 12, 1, 8]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=cu_dtype)
    T = sum(lengths)
    x = torch.randn(T, 32, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, 32, dtype=dtype)
    out = ours(x, cu_seqlens=cu, max_seqlen=max(lengths))
    out_default = ours(x, cu_seqlens=cu)  # max_seqlen computed
    out_ref = torch.cat([ref(x[s:e].unsqueeze(0))[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(out_default, out, rtol=0, atol=0)
    g = _grads((out * dy).sum(), [x] + list(ours.parameters()))
    g_ref = _grads((out_ref * dy).sum(), [x] + list(ref.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_varlen_attn_drop_training_falls_back_per_image():
    ref, ours = _timm_pair(torch.float64, seed=6, attn_drop=0.3)
    ref.train(), ours.train()
    x = torch.randn(11, 32, dtype=torch.float64)
    torch.manual_seed(7)
    a = ours(x, cu_seqlens=torch.tensor([0, 4, 11]))
    torch.manual_seed(7)
    b = torch.cat([ref(x[:4].unsqueeze(0))[0], ref(x[4:].unsqueeze(0))[0]])
    torch.testing.assert_close(a, b, **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_naming_the_argument():
    attn = MaskedTokenAttention(32, num_heads=4)
    x = torch.randn(2, 6, 32)
    packed = torch.randn(10, 32)
    cu = torch.tensor([0, 4, 10])
    cases = [
        (lambda: attn(x, policy=torch.ones(2, 7)), "policy.shape"),
        (lambda: attn(x, policy=torch.ones(2, 6, 2)), "policy.shape"),
        (lambda: attn(x, policy=torch.ones(2, 6, dtype=torch.int64)), "policy.dtype"),
        (lambda: attn(packed), "x"),
        (lambda: attn(packed, policy=torch.ones(10, 1)), "3-D"),
        (lambda: attn(x, cu_seqlens=cu), "2-D packed"),
        (lambda: attn(torch.randn(2, 6, 31)), r"x.shape\[-1\]"),
        (lambda: attn(x, attn_mask=torch.ones(6, 6, dtype=torch.bool), policy=torch.ones(2, 6)), "attn_mask"),
        (lambda: attn(packed, attn_mask=torch.ones(10, 10, dtype=torch.bool), cu_seqlens=cu), "attn_mask"),
        (lambda: attn(x, is_causal=True, policy=torch.ones(2, 6)), "is_causal"),
        (lambda: attn(x, policy=torch.ones(2, 6), cu_seqlens=cu), "not both"),
        (lambda: attn(x, max_seqlen=6), "max_seqlen"),
        (lambda: attn(packed, cu_seqlens=cu.float()), "cu_seqlens.dtype"),
        (lambda: attn(packed, cu_seqlens=cu.view(1, 3)), "cu_seqlens.shape"),
        (lambda: attn(packed, cu_seqlens=torch.tensor([0, 4, 9]), max_seqlen=6), "cu_seqlens"),
        (lambda: MaskedTokenAttention(32, num_heads=5), "num_heads"),
        (lambda: MaskedTokenAttention(32, num_heads=4, qk_norm=True), "norm_layer"),
        (lambda: MaskedTokenAttention(32, num_heads=4, attn_drop=1.5), "attn_drop"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


def test_exported():
    assert fastvit_kernels.MaskedTokenAttention is MaskedTokenAttention
    assert "MaskedTokenAttention" in fastvit_kernels.__all__
