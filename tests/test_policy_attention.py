"""policy_attention: every backend (each CPU ISA, Triton) vs a float64 oracle of DynamicViT's
softmax_with_policy; sizes, keep ratios down to 0.05, dtypes, strided views, extreme scores,
determinism, gradcheck, opcheck, torch.compile and bad input."""

import pytest
import torch

from fastvit_kernels import _native
from fastvit_kernels.ops import policy_attention
from fastvit_kernels.ops.policy_attention import OPS
from fastvit_kernels.reference import policy_attention as reference
from helpers import FLOOR, assert_matches, backend_params, is_interpreted, running_on

BACKENDS = backend_params()
EPS = 1e-6
LAYOUTS = ("fused", "contiguous", "transposed")


def make_inputs(B, H, N, D, dtype=torch.float32, device="cpu", keep=0.7, layout="fused",
                score_scale=1.0, seed=0):
    """q, k, v [B, H, N, D] as views of one qkv projection ("fused", what the module passes),
    separate contiguous tensors, or [B, N, H, D] buffers seen transposed; a 0/1 policy [B, N]
    keeping about `keep` of the tokens (the cls token always kept)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g)
    qkv[:, :, 0] *= score_scale
    qkv = qkv.to(device=device, dtype=dtype)
    if layout == "fused":
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
    elif layout == "contiguous":
        q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4))
    else:
        q, k, v = (qkv[:, :, i].contiguous().transpose(1, 2) for i in range(3))
    policy = (torch.rand(B, N, generator=g) < keep).float()
    policy[:, 0] = 1.0
    return q, k, v, policy.to(device)


def oracle(q, k, v, policy, grad_out, scale, eps=EPS):
    """out, dq, dk, dv, dpolicy of DynamicViT's own formulation (autograd) in float64, and the
    size of the terms dpolicy sums (it adds terms of both signs that can be ~1/eps large)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, policy)]
    out = reference.policy_attention_eager(*leaves, scale, eps)
    out.backward(grad_out.double())
    q64, k64, v64, p64 = (t.detach() for t in leaves)
    s = (q64 @ k64.transpose(-2, -1)) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True))
    a = e * reference._keep_matrix(p64, q.shape[2], torch.float64)
    d = a.sum(-1, keepdim=True) + eps
    go = grad_out.double()
    terms = e * ((go @ v64.transpose(-2, -1)).abs() + (go * out.detach()).sum(-1, keepdim=True).abs()) / d
    return out.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad, terms.sum(dim=(1, 2))


def assert_dpolicy_matches(got, want, scale, dtype):
    assert got.shape == want.shape, f"dpolicy: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), "dpolicy: NaN/inf"
    error = (got.double().cpu() - want.cpu()).abs()
    allowed = FLOOR[dtype] * 4 * scale.cpu() + 1e-30
    worst = (error / allowed).argmax()
    assert (error <= allowed).all(), (
        f"dpolicy: error {error.flatten()[worst]:.3g} > allowed {allowed.flatten()[worst]:.3g} "
        f"(dpolicy {want.flatten()[worst].item():.3g})"
    )


def low_precision_torch(q, k, v, policy, grad_out, scale):
    """The eager formula in the inputs' own dtype: the yardstick for half-precision errors."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference.policy_attention_eager(*leaves, policy.to(q.dtype), scale, EPS)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def run_and_compare(backend, isa, q, k, v, policy, scale=None, grad_out=None, policy_grad=True):
    D = q.shape[3]
    scale_value = D ** -0.5 if scale is None else scale
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    p_leaf = policy.detach().clone().requires_grad_(policy_grad)
    with running_on(backend, isa):
        out = policy_attention(*leaves, p_leaf, scale=scale)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        out.backward(grad_out)
    want = oracle(q, k, v, policy, grad_out, scale_value)
    torch_low = low_precision_torch(q, k, v, policy, grad_out, scale_value)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be a [B, N, H, D] buffer seen as [B, H, N, D]"
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves])):
        if q.shape[2] == 1 and name in ("dq", "dk"):
            # One token: the softmax is constant, dq and dk are exactly zero (the oracle holds
            # ~1e-16 of rounding), so judge the kernels' rounding noise absolutely.
            assert got.abs().max().item() <= FLOOR[q.dtype], f"{name}: {got.abs().max().item():.3g} != 0"
            continue
        assert_matches(name, got, want[i], None if torch_low is None else torch_low[i], dtype=q.dtype)
    if policy_grad:
        assert p_leaf.grad.dtype == policy.dtype
        assert_dpolicy_matches(p_leaf.grad, want[4], want[5], q.dtype)
    else:
        assert p_leaf.grad is None
    return out


def fits(backend, device, B, H, N):
    """Cases the Triton interpreter (numpy, one program at a time) runs in reasonable time."""
    return not (is_interpreted(backend, device) and B * H * N > 800)


# ---------------------------------------------------------------------------------------------
# The reference against DynamicViT's formulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 17, 197])
@pytest.mark.parametrize("keep", [1.0, 0.343, 0.05])
def test_reference_backend_formulas_match_autograd(N, keep):
    """The written-out backward (incl. the gradient through the row max) vs autograd of the
    literal formula, in float64, with scores large enough that some rows have D ~ eps."""
    q, k, v, policy = make_inputs(2, 3, N, 8, dtype=torch.float64, keep=keep, score_scale=4.0)
    grad_out = torch.randn(2, 3, N, 8, dtype=torch.float64)
    out, dq, dk, dv, dp, _ = oracle(q, k, v, policy, grad_out, 8 ** -0.5)
    got = reference.forward(q, k, v, policy.double(), 8 ** -0.5, EPS)
    torch.testing.assert_close(got[0], out, rtol=1e-12, atol=1e-12)
    grads = reference.backward(grad_out, q, k, v, policy.double(), *got, 8 ** -0.5, EPS, True)
    for name, g, w in zip(("dq", "dk", "dv", "dpolicy"), grads, (dq, dk, dv, dp)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9 * (w.abs().max().item() + 1), msg=name)


def test_differs_from_a_masked_softmax():
    """The eps terms make it a different function from a −inf-masked softmax (docs/policy_attention.md, "Notes")."""
    q, k, v, policy = make_inputs(1, 2, 17, 8, dtype=torch.float64, keep=0.3)
    ours = policy_attention(q, k, v, policy)
    mask = (policy.bool()[:, None, None, :] | torch.eye(17, dtype=torch.bool)).expand(1, 2, 17, 17)
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert 1e-9 < (ours - masked).abs().max().item() < 1e-4


def test_gradcheck_float64():
    q, k, v, policy = make_inputs(2, 2, 6, 4, dtype=torch.float64, keep=0.5)
    leaves = tuple(t.detach().double().clone().requires_grad_() for t in (q, k, v, policy))
    assert torch.autograd.gradcheck(lambda a, b, c, p: policy_attention(a, b, c, p, eps=1e-2), leaves)


# ---------------------------------------------------------------------------------------------
# Every backend vs the oracle
# ---------------------------------------------------------------------------------------------

SIZES = [(2, 3, 1, 16), (2, 3, 17, 32), (2, 6, 197, 64), (1, 2, 198, 80)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("B,H,N,D", SIZES, ids=[f"N{s[2]}-D{s[3]}" for s in SIZES])
@pytest.mark.parametrize("keep", [1.0, 0.7, 0.343, 0.05])
def test_sizes_and_keep_ratios(backend_isa_device, B, H, N, D, keep):
    backend, isa, device = backend_isa_device
    if not fits(backend, device, B, H, N):
        B, H = 1, 2
    q, k, v, policy = make_inputs(B, H, N, D, device=device, keep=keep, seed=N + D)
    run_and_compare(backend, isa, q, k, v, policy)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dtypes_and_layouts(backend_isa_device, dtype, layout):
    backend, isa, device = backend_isa_device
    B, H = (1, 2) if is_interpreted(backend, device) else (2, 6)
    q, k, v, policy = make_inputs(B, H, 197, 64, dtype=dtype, device=device, keep=0.49, layout=layout, seed=3)
    grad_out = torch.randn(B, 197, H, 64, generator=torch.Generator().manual_seed(4)).to(device, dtype).transpose(1, 2)
    run_and_compare(backend, isa, q, k, v, policy, grad_out=grad_out)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_low_keep_large_scores_stay_finite(backend_isa_device, dtype):
    """Under AMP users saw NaN losses at low keep ratios: rows whose best keys are dropped have
    D ~ eps. Statistics are fp32, so the outputs stay finite and match the oracle."""
    backend, isa, device = backend_isa_device
    q, k, v, policy = make_inputs(1, 2, 97, 64, dtype=dtype, device=device, keep=0.1, score_scale=6.0, seed=5)
    run_and_compare(backend, isa, q, k, v, policy)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_only_cls_kept_and_policy_without_gradient(backend_isa_device):
    """Every key block but the first is dropped (the kernels skip them; only the diagonal and
    Σv remain), and with a policy that needs no gradient dq/dk/dv are still right."""
    backend, isa, device = backend_isa_device
    q, k, v, policy = make_inputs(2, 2, 150, 32, device=device, keep=0.0, seed=6)
    run_and_compare(backend, isa, q, k, v, policy)
    run_and_compare(backend, isa, q, k, v, policy, policy_grad=False)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_policy_shapes_dtypes_and_soft_values(backend_isa_device):
    """policy [B, N, 1] (DynamicViT's shape) in bfloat16 gets a bfloat16 gradient of that shape;
    non-binary values enter the formula linearly (the oracle takes them as they are)."""
    backend, isa, device = backend_isa_device
    q, k, v, policy = make_inputs(2, 2, 33, 16, device=device, seed=8)
    soft = torch.rand(2, 33, generator=torch.Generator().manual_seed(9)).to(device)
    run_and_compare(backend, isa, q, k, v, soft)
    p = policy[..., None].to(torch.bfloat16).requires_grad_()
    with running_on(backend, isa):
        out = policy_attention(q, k, v, p, scale=0.3, eps=1e-3)
        out.sum().backward()
    assert p.grad.shape == p.shape and p.grad.dtype == torch.bfloat16
    want = reference.policy_attention_eager(q.double(), k.double(), v.double(), policy.double(), 0.3, 1e-3)
    assert_matches("out", out, want)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_deterministic_and_thread_independent(backend_isa_device):
    backend, isa, device = backend_isa_device
    q, k, v, policy = make_inputs(2, 3, 97, 64, device=device, keep=0.5, seed=10)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, policy)]
            with running_on(backend, isa):
                out = policy_attention(*leaves)
                out.backward(torch.ones_like(out))
            results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Compile-safety: opcheck and torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_opcheck(backend_isa_device):
    backend, isa, device = backend_isa_device
    q, k, v, policy = make_inputs(2, 2, 21, 16, device=device, seed=11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, policy)]
    forward, backward, extra = OPS.overloads(backend)  # the ops that run this backend
    with running_on(backend, isa):
        torch.library.opcheck(forward, (*leaves, 0.25, EPS, *extra))
        torch.library.opcheck(forward, (q, k, v, policy, 0.25, EPS, *extra))
        out, row_max, denom, argmax = forward(q, k, v, policy, 0.25, EPS, *extra)
        assert row_max.dtype == denom.dtype == torch.float32 and argmax.dtype == torch.int32
        grad_out = torch.randn_like(out)
        for need in (True, False):
            torch.library.opcheck(backward, (grad_out, q, k, v, policy, out, row_max, denom, argmax, 0.25, EPS, need,
                                             *extra))


def test_compile_fullgraph_matches_eager_without_recompiling():
    def loss(q, k, v, policy):
        return policy_attention(q, k, v, policy).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1):
            q, k, v, policy = make_inputs(2, 3, 17, 16, keep=0.5, seed=seed)
            leaves = [t.clone().requires_grad_() for t in (q, k, v, policy)]
            compiled(*leaves).backward()
            eager = [t.clone().requires_grad_() for t in (q, k, v, policy)]
            loss(*eager).backward()
            for a, b in zip(leaves, eager):
                torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------


def test_default_backend_on_cpu():
    q, k, v, policy = make_inputs(1, 2, 9, 16)
    from fastvit_kernels.ops.policy_attention import select_backend

    expected = "cpu" if _native.available() else "reference"
    assert select_backend(q, k, v, policy, 0.25, EPS).name == expected
    assert select_backend(q.double(), k.double(), v.double(), policy, 0.25, EPS).name == "reference"


def _bad_inputs():
    q = torch.randn(2, 3, 9, 16)
    p = torch.ones(2, 9)
    return [
        ((q[0], q[0], q[0], p), {}, "q must be 4-D"),
        ((q, q[:, :, :8], q, p), {}, "k.shape must be"),
        ((q, q, q.double(), p), {}, "v.dtype must be"),
        ((q.int(), q.int(), q.int(), p), {}, "q.dtype must be"),
        ((q, q, q, torch.ones(2, 8)), {}, "policy.shape must be"),
        ((q, q, q, torch.ones(2, 9, 2)), {}, "policy.shape must be"),
        ((q, q, q, torch.ones(2, 9, dtype=torch.long)), {}, "policy.dtype must be"),
        ((q, q, q, "keep"), {}, "policy must be a torch.Tensor"),
        ((q, q, q, p), {"eps": -1.0}, "eps must be"),
        ((q, q, q, p), {"scale": float("nan")}, "scale must be"),
        ((q.new_empty(2, 3, 0, 16),) * 3 + (p[:, :0],), {}, "every dimension of q"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_names_the_argument(case):
    args, kwargs, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        policy_attention(*args, **kwargs)


@pytest.mark.skipif(not _native.has_kernel("policy_attention_forward"),
                    reason="native extension without policy_attention")
def test_native_entry_point_checks_its_arguments():
    q = torch.randn(1, 2, 9, 16)
    p = torch.ones(1, 9)
    forward = _native.kernel("policy_attention_forward")
    with pytest.raises((RuntimeError, ValueError), match="policy"):
        forward(q, q, q, torch.ones(1, 8), 0.25, EPS)
    with pytest.raises((RuntimeError, ValueError), match="dtype|float"):
        forward(q, q, q.double(), p, 0.25, EPS)
