"""qna_attention: every backend vs a float64 oracle, window sizes, strides, layouts, dtypes,
dispatch and bad input."""

import pytest
import torch

import fastvit_kernels
from fastvit_kernels.ops import qna_attention
from fastvit_kernels.reference import qna_attention as reference
from helpers import assert_matches, backend_params, is_interpreted, running_on

BACKENDS = backend_params()


def explicit_loop(cost, v, rpe, attn_scale, k, stride):
    """The formula (docs/qna_attention.md, "Definition") written as loops over output pixels, queries and heads: an
    oracle for the vectorised reference that shares none of its code."""
    B, Hi, Wi, Q, H = cost.shape
    pad = (k - 1) // 2
    Ho, Wo = (Hi + 2 * pad - k) // stride + 1, (Wi + 2 * pad - k) // stride + 1
    out = torch.zeros(B, Ho, Wo, H, v.shape[4], dtype=cost.dtype)
    for oy in range(Ho):
        for ox in range(Wo):
            taps = [(ty * k + tx, oy * stride - pad + ty, ox * stride - pad + tx)
                    for ty in range(k) for tx in range(k)]
            taps = [(t, y, x) for t, y, x in taps if 0 <= y < Hi and 0 <= x < Wi]
            for q in range(Q):
                scores = torch.stack([cost[:, y, x, q, :] + rpe[t, q] for t, y, x in taps])  # [T, B, H]
                weights = scores.softmax(dim=0)
                for (t, y, x), w in zip(taps, weights):
                    out[:, oy, ox] += (w * attn_scale[t, q]).unsqueeze(-1) * v[:, y, x]
    return out


def make_inputs(B, Hi, Wi, Q, H, d, k, dtype=torch.float32, device="cpu", layout="fused",
                param_dtype=None, score_scale=3.0):
    """Fresh random inputs. Layouts: 'fused' (v and cost are slices of one projection, as the
    QnA module makes them), 'transposed' (spatial dims swapped in memory: no dim is dense),
    'contiguous'. Scores are scaled so that some windows are dominated by one key."""
    g = dict(dtype=dtype, device=device)
    if layout == "fused":
        projection = torch.randn(B, Hi, Wi, H * d + Q * H, **g)
        v = projection[..., : H * d].unflatten(-1, (H, d))
        cost = projection[..., H * d:].unflatten(-1, (Q, H)) * score_scale
    elif layout == "transposed":
        v = torch.randn(B, Wi, Hi, H, d, **g).transpose(1, 2)
        cost = (torch.randn(B, Q, H, Wi, Hi, **g) * score_scale).permute(0, 4, 3, 1, 2)
    else:
        v = torch.randn(B, Hi, Wi, H, d, **g)
        cost = torch.randn(B, Hi, Wi, Q, H, **g) * score_scale
    p = dict(dtype=param_dtype or dtype, device=device)
    rpe = torch.randn(k * k, Q, H, **p)
    attn_scale = torch.randn(k * k, Q, H, **p)
    return cost, v, rpe, attn_scale


def run_and_compare(backend, isa, cost, v, rpe, attn_scale, k, stride):
    """Forward and backward through the op on one backend vs the float64 oracle."""
    leaves = [t.detach().clone().requires_grad_() for t in (cost, v, rpe, attn_scale)]
    with running_on(backend, isa):
        out = qna_attention(*leaves, kernel_size=k, stride=stride)
        grad = torch.randn_like(out)
        out.backward(grad)

    def oracle_of(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (cost, v, rpe, attn_scale)]
        o = reference.qna_attention(*xs, k, stride)
        o.backward(grad.to(dtype))
        return o, [x.grad for x in xs]

    ref_out, ref_grads = oracle_of(torch.float64)
    low_out, low_grads = oracle_of(cost.dtype) if cost.dtype != torch.float32 else (None, [None] * 4)
    B, Hi, Wi = cost.shape[:3]
    Ho, Wo = reference.output_size(Hi, k, stride), reference.output_size(Wi, k, stride)
    assert out.shape == (B, Ho, Wo, v.shape[3], v.shape[4]) and out.dtype == v.dtype
    assert out.is_contiguous()
    assert_matches("out", out, ref_out, low_out)
    for name, leaf, ref, low in zip(("dcost", "dv", "drpe", "dattn_scale"), leaves, ref_grads, low_grads):
        assert leaf.grad.dtype == leaf.dtype, name
        assert_matches(name, leaf.grad, ref, low, dtype=cost.dtype)


def small(backend, device, Hi, Wi):
    """(B, H): the Triton interpreter runs each program in numpy, keep large images light."""
    if is_interpreted(backend, device) and Hi * Wi > 64:
        return 1, 2
    return 2, 3


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hi,Wi,k,stride", [(5, 7, 3, 1), (6, 5, 3, 2), (3, 2, 5, 1), (4, 4, 1, 2),
                                            (2, 3, 7, 2), (1, 1, 3, 1), (9, 4, 13, 1)])
def test_reference_matches_explicit_loops(Hi, Wi, k, stride):
    torch.manual_seed(Hi * 100 + Wi * 10 + k)
    inputs = make_inputs(2, Hi, Wi, 2, 3, 4, k, dtype=torch.float64, layout="contiguous")
    torch.testing.assert_close(reference.qna_attention(*inputs, k, stride), explicit_loop(*inputs, k, stride))


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 2), (1, 1)])
def test_reference_backward_formulas_match_autograd(k, stride):
    """The written-out backward (what the kernels implement) vs autograd, in float64."""
    torch.manual_seed(k * 10 + stride)
    inputs = make_inputs(2, 6, 5, 2, 3, 4, k, dtype=torch.float64, layout="fused")
    xs = [t.detach().requires_grad_() for t in inputs]
    out = reference.qna_attention(*xs, k, stride)
    grad = torch.randn_like(out)
    out.backward(grad)
    _, lse = reference.forward(*inputs, k, stride)
    for got, x in zip(reference.backward(grad, *inputs, lse, k, stride), xs):
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    """The autograd glue (custom op + register_autograd) is exact, checked numerically."""
    torch.manual_seed(1)
    inputs = [t.requires_grad_() for t in make_inputs(1, 4, 3, 2, 2, 3, 3, dtype=torch.float64, layout="fused")]
    assert torch.autograd.gradcheck(lambda *xs: qna_attention(*xs, kernel_size=3, stride=2), inputs)
    assert torch.autograd.gradcheck(lambda c, v: qna_attention(c, v, kernel_size=3), inputs[:2])


# ---------------------------------------------------------------------------------------------
# Every backend vs the oracle
# ---------------------------------------------------------------------------------------------

# (Hi, Wi): 1 pixel, non-square odd grids, images smaller than the window, a QnA-ViT 14x14 map.
IMAGES = [(1, 1), (2, 3), (7, 5), (5, 9), (14, 14)]
WINDOWS = [(1, 1), (3, 1), (3, 2), (5, 1), (7, 2), (13, 1)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Hi,Wi", IMAGES, ids=[f"{h}x{w}" for h, w in IMAGES])
@pytest.mark.parametrize("k,stride", WINDOWS, ids=[f"k{k}s{s}" for k, s in WINDOWS])
def test_images_and_windows(backend_isa_device, Hi, Wi, k, stride):
    backend, isa, device = backend_isa_device
    if is_interpreted(backend, device) and k == 13 and Hi * Wi > 64:
        pytest.skip("13x13 windows on a 14x14 map: too slow for the Triton interpreter")
    torch.manual_seed(Hi * 1000 + Wi * 100 + k * 10 + stride)
    B, H = small(backend, device, Hi, Wi)
    inputs = make_inputs(B, Hi, Wi, 2, H, 8, k, device=device)
    run_and_compare(backend, isa, *inputs, k, stride)


# Large windows (the C++ backend's pixel-lane kernels, k >= 5: docs/qna_attention.md, "Backends"):
# odd and non-square grids, maps smaller and larger than the window, both strides.
LARGE_IMAGES = [(6, 11), (9, 9), (13, 8), (21, 17), (5, 30)]
LARGE_WINDOWS = [(k, s) for k in (5, 7, 9, 11, 13) for s in (1, 2)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Hi,Wi", LARGE_IMAGES, ids=[f"{h}x{w}" for h, w in LARGE_IMAGES])
@pytest.mark.parametrize("k,stride", LARGE_WINDOWS, ids=[f"k{k}s{s}" for k, s in LARGE_WINDOWS])
def test_large_windows(backend_isa_device, Hi, Wi, k, stride):
    backend, isa, device = backend_isa_device
    if is_interpreted(backend, device) and (Hi * Wi > 64 or k > 7):
        pytest.skip("large windows on large maps: too slow for the Triton interpreter")
    torch.manual_seed(Hi * 1000 + Wi * 100 + k * 10 + stride)
    B, H = small(backend, device, Hi, Wi)
    inputs = make_inputs(B, Hi, Wi, 2, H, 8, k, device=device)
    run_and_compare(backend, isa, *inputs, k, stride)


# Queries, heads and head widths: QnA-ViT uses Q=2 with d=8 (tiny) or 16 (base).
WIDTHS = [(1, 1, 1), (2, 8, 8), (3, 5, 16), (2, 2, 5), (1, 4, 32), (2, 3, 64)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Q,H,d", WIDTHS, ids=[f"q{q}h{h}d{d}" for q, h, d in WIDTHS])
def test_queries_heads_widths(backend_isa_device, Q, H, d):
    backend, isa, device = backend_isa_device
    torch.manual_seed(Q * 100 + H * 10 + d)
    inputs = make_inputs(2, 6, 7, Q, H, d, 3, device=device)
    run_and_compare(backend, isa, *inputs, 3, 1)


# The same at k = 7 (the C++ pixel-lane kernels): the forward's register-fused tap weights take
# Q <= 4 with d a multiple of 8 (one or more channel chunks); Q = 5 and d = 1, 5 take the other path.
@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Q,H,d", WIDTHS + [(5, 2, 8)], ids=[f"q{q}h{h}d{d}" for q, h, d in WIDTHS + [(5, 2, 8)]])
@pytest.mark.parametrize("stride", [1, 2])
def test_queries_heads_widths_k7(backend_isa_device, Q, H, d, stride):
    backend, isa, device = backend_isa_device
    if is_interpreted(backend, device):
        pytest.skip("k = 7 on a 9 x 11 map: slow for the Triton interpreter")
    torch.manual_seed(Q * 100 + H * 10 + d + stride)
    inputs = make_inputs(2, 9, 11, Q, H, d, 7, device=device)
    run_and_compare(backend, isa, *inputs, 7, stride)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", ["same-dtype", "fp32-params"])
@pytest.mark.parametrize("k,stride", [(3, 1), (7, 1), (7, 2)], ids=["k3s1", "k7s1", "k7s2"])
def test_dtypes(backend_isa_device, dtype, params, k, stride):
    backend, isa, device = backend_isa_device
    torch.manual_seed(7)
    B, H = small(backend, device, 9, 8)
    inputs = make_inputs(B, 9, 8, 2, H, 8, k, dtype=dtype, device=device,
                         param_dtype=torch.float32 if params == "fp32-params" else None)
    run_and_compare(backend, isa, *inputs, k, stride)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("layout", ["fused", "transposed", "contiguous"])
@pytest.mark.parametrize("k", [3, 7])
def test_layouts(backend_isa_device, layout, k):
    backend, isa, device = backend_isa_device
    torch.manual_seed(11)
    inputs = make_inputs(2, 5, 6, 2, 3, 8, k, device=device, layout=layout)
    run_and_compare(backend, isa, *inputs, k, 2)


CPU_BACKENDS = [p for p in backend_params(include_reference=False) if p.values[0][0] == "cpu"]


@pytest.mark.parametrize("backend_isa_device", CPU_BACKENDS)
@pytest.mark.parametrize("B,Hi,Wi,k,stride", [(1, 28, 28, 3, 1), (1, 28, 28, 7, 1), (1, 29, 27, 7, 2),
                                              (3, 14, 15, 9, 1), (2, 30, 9, 13, 2), (32, 14, 14, 13, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_results(backend_isa_device, B, Hi, Wi, k, stride, dtype):
    """The C++ tasks depend on the shapes only and partial sums are added in a fixed order
    (docs/qna_attention.md, "Numerics"): 1 and 2 threads give bitwise the same forward and
    backward, also where a batch of 1 splits an image into several tasks. With B = 2 and 3 the
    backward sums the rows two tasks share per image on one thread and over the whole batch on
    two (at least two images per thread: csrc/ops/qna_attention.cpp, run_backward_tasks), and
    both must agree bit for bit."""
    backend, isa, _ = backend_isa_device
    torch.manual_seed(B * 100 + k)
    inputs = make_inputs(B, Hi, Wi, 2, 8, 8, k, dtype=dtype)
    grad = None
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            with running_on(backend, isa):
                out = qna_attention(*leaves, kernel_size=k, stride=stride)
                grad = torch.randn_like(out) if grad is None else grad
                out.backward(grad)
            results.append([out.detach()] + [x.grad for x in leaves])
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("out", "dcost", "dv", "drpe", "dattn_scale"), *results):
        assert torch.equal(one, two), f"{name} differs between 1 and 2 threads"


# Large windows at stride 2 on the smallest QnA-ViT map (14 x 14 -> 7 x 7: most taps of most
# windows outside the image) and a non-square one, with batches below and from 16 images (the C++
# forward takes its batch lanes, groups of 16 images, from there: docs/qna_attention.md,
# "Backends"); Q = 3 and d = 5 take its general path, and "far" scores (the top half of the first
# image 80 below the rest) windows on the direct exponentials.
SMALL_MAPS = [(2, 14, 14), (16, 14, 14), (32, 14, 14), (26, 13, 14)]
SMALL_MAP_WIDTHS = [(2, 4, 8, False), (3, 5, 5, False), (2, 4, 8, True)]


@pytest.mark.parametrize("backend_isa_device", CPU_BACKENDS)
@pytest.mark.parametrize("B,Hi,Wi", SMALL_MAPS, ids=[f"b{b}-{h}x{w}" for b, h, w in SMALL_MAPS])
@pytest.mark.parametrize("k", [11, 13])
@pytest.mark.parametrize("Q,H,d,far", SMALL_MAP_WIDTHS,
                         ids=[f"q{q}h{h}d{d}" + ("-far" if f else "") for q, h, d, f in SMALL_MAP_WIDTHS])
def test_large_windows_small_maps_stride2(backend_isa_device, B, Hi, Wi, k, Q, H, d, far):
    backend, isa, _ = backend_isa_device
    torch.manual_seed(B * 1000 + Hi * 100 + Wi * 10 + k + Q)
    cost, v, rpe, attn_scale = make_inputs(B, Hi, Wi, Q, H, d, k, layout="contiguous")
    if far:
        cost[0, : Hi // 2] -= 80.0
    run_and_compare(backend, isa, cost, v, rpe, attn_scale, k, 2)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_defaults_and_non_contiguous_grad(backend_isa_device):
    """rpe/attn_scale None mean zeros/ones; the output gradient may come in any layout; no-grad
    and grad forwards agree."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(5)
    cost, v, _, _ = make_inputs(2, 5, 4, 2, 3, 8, 3, device=device)
    with running_on(backend, isa):
        with torch.no_grad():
            out_nograd = qna_attention(cost, v, kernel_size=3)
        leaves = [t.detach().clone().requires_grad_() for t in (cost, v)]
        out = qna_attention(*leaves, kernel_size=3)
        torch.testing.assert_close(out, out_nograd, rtol=0, atol=0)
        grad = torch.randn(8, 3, 2, 4, 5, device=device).permute(2, 4, 3, 1, 0)  # every stride unusual
        out.backward(grad)
    ones, zeros = torch.ones(9, 2, 3, dtype=torch.float64), torch.zeros(9, 2, 3, dtype=torch.float64)
    xs = [t.detach().double().requires_grad_() for t in (cost, v)]
    ref = reference.qna_attention(*xs, zeros, ones, 3, 1)
    ref.backward(grad.double())
    assert_matches("out", out, ref)
    for name, got, x in zip(("dcost", "dv"), leaves, xs):
        assert_matches(name, got.grad, x.grad)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_large_scores_stay_finite(backend_isa_device, dtype):
    """Scores far beyond fp16's exp range (the JAX original overflows past ~11): a per-window
    max is subtracted, so the result is finite and right."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(2)
    inputs = make_inputs(1, 6, 6, 2, 2, 8, 3, dtype=dtype, device=device, score_scale=40.0)
    run_and_compare(backend, isa, *inputs, 3, 1)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_cpu_backend_is_default_when_built():
    from fastvit_kernels import _native
    from fastvit_kernels.ops.qna_attention import select_backend

    cost, v, rpe, attn_scale = make_inputs(1, 3, 3, 2, 2, 8, 3)
    expected = "cpu" if _native.available() else "reference"
    assert select_backend(cost, v, rpe, attn_scale, 3, 1).name == expected


def test_forced_backend_refusal_names_the_reason():
    cost, v, _, _ = make_inputs(1, 3, 3, 2, 2, 8, 3)
    cost, v = cost.double(), v.double()  # float64 runs on the reference only
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="'cpu' cannot run.*float64"):
        qna_attention(cost, v, kernel_size=3)


def test_native_limits_fall_back_to_reference():
    """Windows above the kernels' limit run on the reference (and forcing 'cpu' says why)."""
    cost, v, _, _ = make_inputs(1, 3, 3, 1, 2, 4, 3)
    out = qna_attention(cost, v, kernel_size=17)
    torch.testing.assert_close(out, reference.qna_attention(
        cost, v, torch.zeros(289, 1, 2), torch.ones(289, 1, 2), 17, 1))
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="kernel_size 17 > 15"):
        qna_attention(cost, v, kernel_size=17)


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, the expected and the given value
# ---------------------------------------------------------------------------------------------


def _call(**kw):
    cost, v, rpe, attn_scale = make_inputs(2, 5, 6, 2, 3, 8, 3, layout="contiguous")
    args = dict(cost=cost, v=v, rpe=rpe, attn_scale=attn_scale, kernel_size=3, stride=1)
    args.update(kw)
    return qna_attention(args.pop("cost"), args.pop("v"), args.pop("rpe"), args.pop("attn_scale"), **args)


BAD = [
    ("even kernel", dict(kernel_size=4), r"kernel_size must be odd and >= 1.*got 4"),
    ("zero kernel", dict(kernel_size=0), r"kernel_size must be odd"),
    ("float kernel", dict(kernel_size=3.0), r"kernel_size must be an int, got float"),
    ("stride 0", dict(stride=0), r"stride must be >= 1, got 0"),
    ("cost rank", dict(cost=torch.randn(2, 5, 6, 6)), r"cost must be 5-D \[B, Hi, Wi, Q, h\], got 4-D"),
    ("v rank", dict(v=torch.randn(2, 5, 6, 24)), r"v must be 5-D \[B, Hi, Wi, h, d\], got 4-D"),
    ("v image", dict(v=torch.randn(2, 6, 5, 3, 8)), r"v.shape\[:3\] \(B, Hi, Wi\) must be \(2, 5, 6\).*got \(2, 6, 5\)"),
    ("v heads", dict(v=torch.randn(2, 5, 6, 4, 8)), r"v.shape\[3\] \(heads h\) must be 3.*got 4"),
    ("dtype mix", dict(v=torch.randn(2, 5, 6, 3, 8, dtype=torch.float16)), r"v.dtype must be cost's dtype torch.float32, got torch.float16"),
    ("int cost", dict(cost=torch.ones(2, 5, 6, 2, 3, dtype=torch.int32)), r"cost must be of dtype float32, bfloat16 or float16"),
    ("rpe shape", dict(rpe=torch.randn(9, 6)), r"rpe.shape must be \[k\*k=9, Q=2, h=3\], got \[9, 6\]"),
    ("rpe window", dict(rpe=torch.randn(25, 2, 3)), r"rpe.shape must be \[k\*k=9"),
    ("scale shape", dict(attn_scale=torch.randn(9, 3, 2)), r"attn_scale.shape must be \[k\*k=9, Q=2, h=3\], got \[9, 3, 2\]"),
    ("rpe dtype", dict(rpe=torch.randn(9, 2, 3, dtype=torch.float64)), r"rpe.dtype must be cost's dtype torch.float32 or torch.float32, got torch.float64"),
    ("rpe not tensor", dict(rpe=[0.0] * 9), r"rpe must be a torch.Tensor or None, got list"),
    ("empty image", dict(cost=torch.randn(2, 0, 6, 2, 3), v=torch.randn(2, 0, 6, 3, 8)), r"every dimension of cost and v must be >= 1"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"v.device must be cost's device"):
        _call(v=torch.randn(2, 5, 6, 3, 8, device="cuda"))
