"""ggem_pool: every backend (each CPU ISA, Triton) vs a float64 oracle; sizes, layouts, dtypes,
prefix tokens, strided views, large p and x near eps, determinism, gradcheck, opcheck,
torch.compile, dispatch and bad input."""

import math

import pytest
import torch

import fastvit_kernels
from fastvit_kernels import _native
from fastvit_kernels.ops import ggem_pool
from fastvit_kernels.ops.ggem_pool import OPS
from fastvit_kernels.reference import ggem_pool as reference
from helpers import FLOOR, assert_matches, backend_params, is_interpreted, running_on

BACKENDS = backend_params()
EPS = 1e-6


def make_inputs(B, N, C, groups, dtype=torch.float32, device="cpu", p_dtype=torch.float32,
                p_range=(1.0, 10.0), scale=1.0, seed=0):
    """Normal tokens (half of them below eps, so the clamp is exercised) and exponents drawn
    uniformly from p_range, one per group."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(B, N, C, generator=g)).to(device=device, dtype=dtype)
    low, high = p_range
    p = (low + (high - low) * torch.rand(groups, generator=g)).to(device=device, dtype=p_dtype)
    return x, p


def oracle(x, p, grad_y, groups, layout, prefix, eps=EPS):
    """y, dx, dp of the literal formula in float64, and the size of the terms dp sums."""
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_()
    y = reference.ggem_pool(x64, p64, groups, eps, layout, prefix)
    y.backward(grad_y.double())
    return y.detach(), x64.grad, p64.grad, dp_scale(x, p, grad_y, groups, layout, prefix, eps)


def dp_scale(x, p, grad_y, groups, layout, prefix, eps=EPS):
    """Σ_b Σ_{c in g} |grad_y · y| · (|T/S| + |ln S| / p) / p: dp is a sum of terms this large
    (of both signs, and T/S - ln S / p cancels when a channel's tokens are alike), so its error
    is judged against this scale rather than against |dp|."""
    interleaved = layout == "interleaved"
    pc = reference.per_channel(p.double(), x.shape[2], interleaved)
    log_x = x[:, prefix:].double().clamp(min=eps).log()
    logits = pc * log_x
    log_mean = torch.logsumexp(logits, 1) - math.log(x.shape[1] - prefix)
    t_over_s = (logits.softmax(1) * log_x).sum(1)
    y = torch.exp(log_mean / pc)
    terms = (grad_y.double() * y).abs() * (t_over_s.abs() + log_mean.abs() / pc) / pc
    out = torch.zeros(p.shape[0], dtype=torch.float64)
    out.index_add_(0, reference.channel_group(x.shape[2], p.shape[0], interleaved), terms.sum(0).cpu())
    return out


def assert_dp_matches(got, want, scale, dtype):
    assert got.shape == want.shape, f"dp: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), "dp: NaN/inf"
    error = (got.double().cpu() - want.cpu()).abs()
    allowed = FLOOR[dtype] * scale + 1e-30
    worst = (error / allowed).argmax()
    assert (error <= allowed).all(), (
        f"dp: error {error[worst]:.3g} > allowed {allowed[worst]:.3g} in group {int(worst)} "
        f"(dp {want[worst].item():.3g}, term scale {scale[worst]:.3g})"
    )


def run_and_compare(backend, isa, x, p, groups, layout="contiguous", prefix=0, eps=EPS, grad_y=None):
    """Forward and backward through the op on one backend vs the float64 oracle."""
    x_leaf = x.detach().clone().requires_grad_()
    p_leaf = p.detach().clone().requires_grad_()
    with running_on(backend, isa):
        y = ggem_pool(x_leaf, p_leaf, groups=groups, eps=eps, layout=layout, num_prefix_tokens=prefix)
        if grad_y is None:
            grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        y.backward(grad_y)
    want_y, want_dx, want_dp, scale = oracle(x, p, grad_y, groups, layout, prefix, eps)
    assert y.shape == (x.shape[0], x.shape[2]) and y.dtype == x.dtype
    assert_matches("y", y, want_y)
    assert x_leaf.grad.dtype == x.dtype  # (its layout is autograd's: it follows the leaf's strides)
    assert_matches("dx", x_leaf.grad, want_dx)
    assert (x_leaf.grad[:, :prefix] == 0).all(), "prefix tokens must get zero gradient"
    assert p_leaf.grad.dtype == p.dtype
    assert_dp_matches(p_leaf.grad, want_dp, scale, p.dtype)
    return y, x_leaf.grad, p_leaf.grad


def small_batch(backend, device, N, C):
    # The Triton interpreter runs each program in numpy: keep big cases to one image.
    return 1 if is_interpreted(backend, device) and N * C > 50_000 else 2


# ---------------------------------------------------------------------------------------------
# The reference against itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", reference.LAYOUTS)
@pytest.mark.parametrize("prefix", [0, 2])
def test_reference_backend_formulas_match_autograd(layout, prefix):
    """The written-out backward (what the kernels implement) and the log-domain forward vs
    autograd through the literal formula, in float64."""
    x, p = make_inputs(3, 11, 12, 4, dtype=torch.float64, p_dtype=torch.float64, p_range=(0.5, 10))
    grad_y = torch.randn(3, 12, dtype=torch.float64)
    want_y, want_dx, want_dp, _ = oracle(x, p, grad_y, 4, layout, prefix)
    y, log_mean = reference.forward(x, p, 4, EPS, layout == "interleaved", prefix)
    dx, dp = reference.backward(grad_y, x, p, log_mean, 4, EPS, layout == "interleaved", prefix)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx, want_dx, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dp, want_dp, rtol=1e-10, atol=1e-14)
    stable = reference.ggem_pool_stable(x, p, 4, EPS, layout, prefix)
    torch.testing.assert_close(stable, want_y, rtol=1e-12, atol=0)


def test_layouts_group_channels_as_documented():
    x, _ = make_inputs(2, 5, 6, 2, dtype=torch.float64)
    p = torch.tensor([1.0, 4.0], dtype=torch.float64)
    for layout, groups_of_channels in (("contiguous", [0, 0, 0, 1, 1, 1]), ("interleaved", [0, 1, 0, 1, 0, 1])):
        y = reference.ggem_pool(x, p, 2, EPS, layout)
        for c, g in enumerate(groups_of_channels):
            pc = p[g]
            expected = x[:, :, c].clamp(min=EPS).pow(pc).mean(1).pow(1 / pc)
            torch.testing.assert_close(y[:, c], expected)


def test_gradcheck_float64():
    """The autograd glue (custom op + register_autograd) is exact, checked numerically."""
    x, p = make_inputs(2, 6, 8, 2, dtype=torch.float64, p_dtype=torch.float64, p_range=(1.0, 4.0))
    x = x.abs() + 0.1  # keep the finite differences away from the clamp's kink
    for layout, prefix in (("contiguous", 0), ("interleaved", 2)):
        leaves = (x.clone().requires_grad_(), p.clone().requires_grad_())
        assert torch.autograd.gradcheck(
            lambda a, b: ggem_pool(a, b, groups=2, layout=layout, num_prefix_tokens=prefix), leaves
        )


# ---------------------------------------------------------------------------------------------
# Every backend vs the oracle
# ---------------------------------------------------------------------------------------------

SIZES = [(N, C) for N in (1, 2, 196, 197, 577) for C in (8, 192, 384, 768, 1024)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("N,C", SIZES, ids=[f"N{n}-C{c}" for n, c in SIZES])
def test_sizes(backend_isa_device, N, C):
    backend, isa, device = backend_isa_device
    groups = 2 if C == 8 else C // 64
    layout = reference.LAYOUTS[(N + C) % 2]
    x, p = make_inputs(small_batch(backend, device, N, C), N, C, groups, device=device, seed=N * 7 + C)
    run_and_compare(backend, isa, x, p, groups, layout, prefix=1 if N > 1 else 0)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", reference.LAYOUTS)
@pytest.mark.parametrize("p_in_x_dtype", [False, True], ids=["p-fp32", "p-same"])
def test_dtypes(backend_isa_device, dtype, layout, p_in_x_dtype):
    backend, isa, device = backend_isa_device
    x, p = make_inputs(small_batch(backend, device, 197, 768), 197, 768, 12, dtype=dtype, device=device,
                       p_dtype=dtype if p_in_x_dtype else torch.float32, seed=3)
    run_and_compare(backend, isa, x, p, 12, layout, prefix=1)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("p_value", [1.0, 1.5, 3.0, 6.5, 10.0, 0.5])
def test_exponents(backend_isa_device, p_value):
    backend, isa, device = backend_isa_device
    x, _ = make_inputs(2, 49, 64, 4, device=device, seed=5)
    p = torch.full((4,), p_value, device=device)
    run_and_compare(backend, isa, x, p, 4, "interleaved", prefix=1)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("prefix", [0, 1, 5, 24])
def test_prefix_tokens(backend_isa_device, prefix):
    """cls / register tokens are skipped in place (N - prefix pooled tokens; 24 leaves one)."""
    backend, isa, device = backend_isa_device
    x, p = make_inputs(2, 25, 48, 3, device=device, seed=prefix)
    run_and_compare(backend, isa, x, p, 3, "contiguous", prefix=prefix)


def _views(device):
    """Strided x views the op must read: a channel window and a token window of bigger buffers,
    every other image, a transpose (channel stride != 1)."""
    g = torch.Generator().manual_seed(9)
    big = torch.randn(4, 40, 200, generator=g).to(device)
    return {
        "channel-slice": big[:2, :, 40:136],  # [2, 40, 96], rows of 200 elements
        "token-slice": big[:2, 3:37, :96],
        "every-other-image": big[::2, :, :96],
        "transposed": torch.randn(2, 96, 30, generator=g).to(device).transpose(1, 2),
        "expanded-batch": torch.randn(1, 30, 96, generator=g).to(device).expand(3, 30, 96),
    }


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("view", list(_views("cpu")))
def test_strided_views(backend_isa_device, view):
    backend, isa, device = backend_isa_device
    x = _views(device)[view]
    p = torch.linspace(1.0, 10.0, 6, device=device)
    # The output gradient may come in any layout too.
    grad_y = torch.randn(96, x.shape[0], generator=torch.Generator().manual_seed(2)).to(device).t()
    run_and_compare(backend, isa, x, p, 6, "interleaved", prefix=1, grad_y=grad_y)


# ---------------------------------------------------------------------------------------------
# Numerics: large p, x near eps, large x in half precision
# ---------------------------------------------------------------------------------------------


def _log_uniform(shape, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand(shape, generator=g))


NUMERIC_CASES = {
    # name: (x builder, dtype): p = 10 everywhere, where x^p underflows / overflows float32
    "tiny-x": (lambda: _log_uniform((2, 197, 64), 1e-6, 1e-3, 0), torch.float32),
    # Within 1% of eps on both sides, but never within rounding of it (the kernels clamp at
    # float32(eps), the float64 oracle at eps: they may disagree on x == float32(eps) only).
    "at-eps": (lambda: EPS * (1 + (0.001 + 0.01 * torch.rand(2, 197, 64)) * torch.randn(2, 197, 64).sign()), torch.float32),
    "all-clamped": (lambda: -torch.rand(2, 197, 64), torch.float32),
    "one-token-dominates": (lambda: torch.cat([torch.full((2, 1, 64), 50.0), _log_uniform((2, 196, 64), 1e-6, 1.0, 1)], 1), torch.float32),
    "large-x-fp32": (lambda: _log_uniform((2, 197, 64), 1.0, 1e6, 2), torch.float32),
    "x~100-fp16": (lambda: 100 * (1 + 0.5 * torch.rand(2, 197, 64)), torch.float16),
    "x~100-bf16": (lambda: 100 * (1 + 0.5 * torch.rand(2, 197, 64)), torch.bfloat16),
    "x~1e4-fp16": (lambda: _log_uniform((2, 197, 64), 1.0, 3e4, 3), torch.float16),
    "tiny-x-fp16": (lambda: _log_uniform((2, 197, 64), 1e-6, 1e-3, 4), torch.float16),
    "tiny-x-bf16": (lambda: _log_uniform((2, 197, 64), 1e-6, 1e-3, 5), torch.bfloat16),
}


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("case", list(NUMERIC_CASES))
def test_large_p_and_extreme_inputs(backend_isa_device, case):
    """p = 10: x^p would under/overflow float32 (1e-60, 1e40); the kernels work in the log
    domain, so whatever the float64 reference computes finitely, they do too."""
    backend, isa, device = backend_isa_device
    build, dtype = NUMERIC_CASES[case]
    x = build().to(device=device, dtype=dtype)
    p = torch.tensor([10.0, 10.0, 9.0, 7.5], device=device)
    y, dx, dp = run_and_compare(backend, isa, x, p, 4, "contiguous", prefix=1)
    if case == "all-clamped":  # y = eps exactly (up to rounding), no gradient reaches x
        torch.testing.assert_close(y, torch.full_like(y, EPS), rtol=1e-5, atol=0)
        assert (dx == 0).all()


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_custom_eps(backend_isa_device):
    backend, isa, device = backend_isa_device
    x, p = make_inputs(2, 20, 32, 2, device=device, seed=12)
    run_and_compare(backend, isa, x, p, 2, "contiguous", prefix=1, eps=0.3)


# ---------------------------------------------------------------------------------------------
# Determinism, inference, the module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_deterministic_and_thread_independent(backend_isa_device):
    """dp is a fixed-order sum (no atomics): bitwise equal across runs and thread counts."""
    backend, isa, device = backend_isa_device
    x, p = make_inputs(small_batch(backend, device, 50, 96) * 3, 50, 96, 6, device=device, seed=4)
    grad_y = torch.randn(x.shape[0], 96, device=device)
    threads = torch.get_num_threads()
    results = []
    for num_threads in (threads, 1, threads):
        torch.set_num_threads(num_threads)
        try:
            x_leaf, p_leaf = x.clone().requires_grad_(), p.clone().requires_grad_()
            with running_on(backend, isa):
                y = ggem_pool(x_leaf, p_leaf, groups=6, num_prefix_tokens=1)
                y.backward(grad_y)
            results.append((y, x_leaf.grad, p_leaf.grad))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_no_grad_and_p_only_grad(backend_isa_device):
    backend, isa, device = backend_isa_device
    x, p = make_inputs(2, 17, 32, 4, device=device, seed=6)
    with running_on(backend, isa):
        with torch.no_grad():
            y_nograd = ggem_pool(x, p, groups=4)
        p_leaf = p.clone().requires_grad_()
        y = ggem_pool(x, p_leaf, groups=4)
        torch.testing.assert_close(y, y_nograd, rtol=0, atol=0)
        y.sum().backward()
    _, _, want_dp, scale = oracle(x, p, torch.ones_like(y), 4, "contiguous", 0)
    assert_dp_matches(p_leaf.grad, want_dp, scale, torch.float32)


def test_module_matches_the_op_and_keeps_p_in_float32():
    torch.manual_seed(0)
    module = fastvit_kernels.GGeM(96, 6, p=2.5, layout="interleaved", num_prefix_tokens=1)
    assert isinstance(module.p, torch.nn.Parameter) and module.p.dtype == torch.float32
    assert torch.equal(module.p.detach(), torch.full((6,), 2.5))
    x = torch.randn(2, 10, 96)
    want = reference.ggem_pool(x.double(), module.p.detach().double(), 6, 1e-6, "interleaved", 1)
    assert_matches("module", module(x), want)
    assert_matches("module bf16", module(x.bfloat16()), reference.ggem_pool(
        x.bfloat16().double(), module.p.detach().double(), 6, 1e-6, "interleaved", 1))
    module(x).sum().backward()
    assert module.p.grad is not None and module.p.grad.shape == (6,)
    fixed = fastvit_kernels.GGeM(96, 6, learnable=False)
    assert "p" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    assert "learnable=False" in repr(fixed)
    for kwargs, message in ((dict(dim=10, groups=3), "divisible"), (dict(dim=12, groups=3, p=0.0), "p must be"),
                            (dict(dim=12, groups=3, layout="blocked"), "layout"), (dict(dim=12, groups=3, eps=0.0), "eps")):
        with pytest.raises(ValueError, match=message):
            fastvit_kernels.GGeM(**kwargs)


# ---------------------------------------------------------------------------------------------
# Compile-safety: opcheck and torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(backend_isa_device, interleaved):
    backend, isa, device = backend_isa_device
    x, p = make_inputs(2, 9, 32, 4, device=device, seed=7)
    leaves = (x.clone().requires_grad_(), p.clone().requires_grad_())
    forward, backward, extra = OPS.overloads(backend)  # the ops that run this backend
    with running_on(backend, isa):
        torch.library.opcheck(forward, (*leaves, 4, EPS, interleaved, 1, *extra))
        torch.library.opcheck(forward, (x[:, :, :16], p, 4, EPS, interleaved, 0, *extra))
        y, log_mean = forward(x, p, 4, EPS, interleaved, 1, *extra)
        assert y.is_contiguous() and log_mean.is_contiguous() and log_mean.dtype == torch.float32
        grad_y = torch.randn_like(y)
        torch.library.opcheck(backward, (grad_y, x, p, log_mean, 4, EPS, interleaved, 1, *extra))
        dx, dp = backward(grad_y, x.transpose(0, 1).contiguous().transpose(0, 1), p, log_mean, 4, EPS, interleaved, 1,
                          *extra)
        assert dx.is_contiguous() and dx.shape == x.shape and dp.shape == p.shape


def test_compile_fullgraph_matches_eager_without_recompiling():
    torch._dynamo.reset()
    module = fastvit_kernels.GGeM(96, 6, num_prefix_tokens=1)

    def step(tokens, weight):
        return (module(tokens @ weight) ** 2).mean()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second call must reuse the first graph
            torch.manual_seed(seed)
            tokens, weight = torch.randn(2, 17, 32), torch.randn(32, 96)
            eager_w, compiled_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
            module.zero_grad()
            expected = step(tokens, eager_w)
            expected.backward()
            eager_dp = module.p.grad.clone()
            module.zero_grad()
            got = compiled(tokens, compiled_w)
            got.backward()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled_w.grad, eager_w.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module.p.grad, eager_dp, rtol=1e-5, atol=1e-6)


def test_reference_is_exportable():
    """The stable reference is plain tensor code: the path for users who export."""
    x, p = make_inputs(2, 10, 24, 3, seed=8)

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(p)

        def forward(self, tokens):
            return reference.ggem_pool_stable(tokens, self.p, 3, EPS, "contiguous", 1)

    exported = torch.export.export(Pool(), (x,))
    torch.testing.assert_close(exported.module()(x), reference.ggem_pool_stable(x, p, 3, EPS, "contiguous", 1))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_cpu_backend_is_default_when_native_is_built():
    """With the native extension built, CPU tensors must run the C++ kernels: an extension built
    before ggem_pool existed is a stale build, and this fails instead of testing the reference."""
    from fastvit_kernels.ops.ggem_pool import BACKENDS as OP_BACKENDS, select_backend

    x, p = make_inputs(1, 4, 16, 2)
    if not _native.available():
        assert select_backend(x, p).name == "reference"
        pytest.skip(f"native extension not built: {_native.load_error}")
    assert select_backend(x, p).name == "cpu", OP_BACKENDS.reasons(x, p)["cpu"]


def test_stale_native_build_is_reported(monkeypatch):
    """A native build that registered no ggem kernels: forcing 'cpu' says to rebuild."""
    monkeypatch.setattr(_native, "has_kernel", lambda name: False)
    x, p = make_inputs(1, 4, 16, 2)
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="built without ggem_pool"):
        ggem_pool(x, p, groups=2)


def test_forced_backend_refusal_names_the_reason():
    x, p = make_inputs(1, 4, 16, 2, dtype=torch.float64, p_dtype=torch.float64)  # reference only
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="'cpu' cannot run.*float64"):
        ggem_pool(x, p, groups=2)


def test_float64_runs_on_the_reference_and_forcing_cpu_explains():
    x, p = make_inputs(1, 4, 16, 2, dtype=torch.float64, p_dtype=torch.float64)
    torch.testing.assert_close(ggem_pool(x, p, groups=2), reference.ggem_pool(x, p, 2))
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="float64"):
        ggem_pool(x, p, groups=2)


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, the expected and the given value
# ---------------------------------------------------------------------------------------------


def _call(**kw):
    x, p = make_inputs(2, 7, 12, 3)
    args = dict(x=x, p=p, groups=3)
    args.update(kw)
    return ggem_pool(args.pop("x"), args.pop("p"), **args)


BAD = [
    ("x rank", dict(x=torch.randn(7, 12)), r"x must be 3-D \[B, N, C\], got 2-D"),
    ("x not tensor", dict(x=[[1.0]]), r"x must be a torch.Tensor, got list"),
    ("int x", dict(x=torch.ones(2, 7, 12, dtype=torch.int32)), r"x must be of dtype float32, bfloat16 or float16"),
    ("C % groups", dict(groups=5, p=torch.ones(5)), r"x.shape\[2\] \(C\) must be divisible by groups=5, got 12"),
    ("groups 0", dict(groups=0, p=torch.ones(0)), r"groups must be >= 1, got 0"),
    ("groups float", dict(groups=3.0), r"groups must be an int, got float"),
    ("p shape", dict(p=torch.ones(4)), r"p.shape must be \[groups=3\], got \[4\]"),
    ("p 2-D", dict(p=torch.ones(3, 1)), r"p.shape must be \[groups=3\], got \[3, 1\]"),
    ("p not tensor", dict(p=3.0), r"p must be a torch.Tensor, got float"),
    ("p dtype", dict(p=torch.ones(3, dtype=torch.float64)), r"p.dtype must be x's dtype torch.float32 or torch.float32, got torch.float64"),
    ("p zero", dict(p=torch.tensor([3.0, 0.0, 3.0])), r"every p must be finite and > 0, got values from 0 to 3"),
    ("p negative", dict(p=torch.tensor([-1.0, 2.0, 3.0])), r"every p must be finite and > 0, got values from -1 to 3"),
    ("p nan", dict(p=torch.tensor([1.0, float("nan"), 3.0])), r"every p must be finite and > 0"),
    ("p inf", dict(p=torch.tensor([1.0, float("inf"), 3.0])), r"every p must be finite and > 0"),
    ("layout", dict(layout="blocked"), r"layout must be one of \('contiguous', 'interleaved'\), got 'blocked'"),
    ("prefix = N", dict(num_prefix_tokens=7), r"num_prefix_tokens must be in \[0, N=7\).*got 7"),
    ("prefix > N", dict(num_prefix_tokens=9), r"num_prefix_tokens must be in \[0, N=7\)"),
    ("prefix negative", dict(num_prefix_tokens=-1), r"num_prefix_tokens must be in \[0, N=7\).*got -1"),
    ("prefix float", dict(num_prefix_tokens=1.0), r"num_prefix_tokens must be an int, got float"),
    ("eps zero", dict(eps=0.0), r"eps must be a finite float >= 1.2e-38 \(float32's smallest normal\), got 0.0"),
    ("eps nan", dict(eps=float("nan")), r"eps must be a finite float"),
    ("eps string", dict(eps="1e-6"), r"eps must be a finite float"),
    ("no tokens", dict(x=torch.randn(2, 0, 12)), r"num_prefix_tokens must be in \[0, N=0\)"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


def test_bad_p_is_reported_inside_compiled_graphs():
    """p > 0 needs p's values, so it is checked inside the op: it holds under torch.compile too."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p: ggem_pool(x, p, groups=3), fullgraph=True)
    x, _ = make_inputs(2, 7, 12, 3)
    with pytest.raises(Exception, match="every p must be finite and > 0"):
        compiled(x, torch.tensor([1.0, -2.0, 3.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"p.device must be x's device"):
        _call(p=torch.ones(3, device="cuda"))
