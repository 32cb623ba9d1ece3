"""varlen_attention: every backend (each CPU ISA, Triton) vs per-image float64 attention over
random segment lengths (including 1), dtypes, strided views, determinism, gradcheck, opcheck,
torch.compile and bad cu_seqlens / max_seqlen."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import _native
from fastvit_kernels.ops import varlen_attention
from fastvit_kernels.ops.varlen_attention import OPS
from fastvit_kernels.reference import varlen_attention as reference
from helpers import assert_matches, backend_params, is_interpreted, running_on

BACKENDS = backend_params()


def make_inputs(lengths, H, D, dtype=torch.float32, device="cpu", layout="fused", score_scale=1.0, seed=0):
    """Packed q, k, v [T, H, D] ("fused": views of one [T, 3, H, D] projection, as the module
    passes them; "contiguous"; "transposed": [H, T, D] buffers seen as [T, H, D]) and int32
    cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    qkv = torch.randn(T, 3, H, D, generator=g)
    qkv[:, 0] *= score_scale
    qkv = qkv.to(device=device, dtype=dtype)
    if layout == "fused":
        q, k, v = qkv.unbind(1)
    elif layout == "contiguous":
        q, k, v = (t.contiguous() for t in qkv.unbind(1))
    else:
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in qkv.unbind(1))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return q, k, v, cu


def oracle(q, k, v, cu, grad_out, scale):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.varlen_attention_eager(*leaves, cu.cpu(), scale)
    out.backward(grad_out.double())
    return [out.detach()] + [t.grad for t in leaves]


def low_precision_torch(q, k, v, cu, grad_out, scale):
    if q.dtype not in (torch.bfloat16, torch.float16):
        return None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference.varlen_attention_eager(*leaves, cu.cpu(), scale)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def run_and_compare(backend, isa, q, k, v, cu, grad_out=None, max_seqlen=None):
    lengths = (cu[1:] - cu[:-1]).tolist()
    max_seqlen = max(lengths) if max_seqlen is None else max_seqlen
    scale = q.shape[2] ** -0.5
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with running_on(backend, isa):
        out = varlen_attention(*leaves, cu, max_seqlen)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        out.backward(grad_out)
    want = oracle(q, k, v, cu, grad_out, scale)
    torch_low = low_precision_torch(q, k, v, cu, grad_out, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    for i, (name, got) in enumerate(zip(("out", "dq", "dk", "dv"), [out] + [t.grad for t in leaves])):
        assert_matches(name, got, want[i], None if torch_low is None else torch_low[i], dtype=q.dtype)


def random_lengths(count, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def test_reference_backend_formulas_match_autograd():
    q, k, v, cu = make_inputs([1, 7, 30, 2], 3, 8, dtype=torch.float64, score_scale=3.0)
    grad_out = torch.randn_like(q)
    want = oracle(q, k, v, cu, grad_out, 0.3)
    out, lse = reference.forward(q, k, v, cu.long(), 30, 0.3)
    torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-12)
    for got, w in zip(reference.backward(grad_out, q, k, v, out, lse, cu.long(), 30, 0.3), want[1:]):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


def test_one_segment_is_plain_attention():
    q, k, v, cu = make_inputs([50], 4, 16, dtype=torch.float64)
    want = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, 50), want)


def test_gradcheck_float64():
    q, k, v, cu = make_inputs([1, 3, 4], 2, 4, dtype=torch.float64)
    leaves = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: varlen_attention(a, b, c, cu, 4), leaves)


# ---------------------------------------------------------------------------------------------
# Every backend vs the oracle
# ---------------------------------------------------------------------------------------------

SEGMENTS = {
    "one-token": [1],
    "ones-and-odd": [1, 7, 1, 17, 2],
    "dynamicvit": [197, 68, 138, 1, 97],
    "long": [300, 5],
    "random": random_lengths(12, 1, 200, seed=3),
}


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("segments", list(SEGMENTS), ids=list(SEGMENTS))
@pytest.mark.parametrize("D", [16, 64, 80])
def test_segment_lengths(backend_isa_device, segments, D):
    backend, isa, device = backend_isa_device
    lengths = SEGMENTS[segments]
    H = 1 if is_interpreted(backend, device) and sum(lengths) > 300 else 3
    q, k, v, cu = make_inputs(lengths, H, D, device=device, seed=D)
    run_and_compare(backend, isa, q, k, v, cu)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["fused", "contiguous", "transposed"])
def test_dtypes_and_layouts(backend_isa_device, dtype, layout):
    backend, isa, device = backend_isa_device
    H = 2 if is_interpreted(backend, device) else 6
    q, k, v, cu = make_inputs([97, 1, 68, 33], H, 64, dtype=dtype, device=device, layout=layout,
                              score_scale=3.0, seed=5)
    grad_out = torch.randn(H, q.shape[0], 64, generator=torch.Generator().manual_seed(6)).to(device, dtype).transpose(0, 1)
    # max_seqlen may be larger than the longest segment (an upper bound, as in flash-attention)
    run_and_compare(backend, isa, q, k, v, cu, grad_out=grad_out, max_seqlen=120)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_deterministic_and_thread_independent(backend_isa_device):
    backend, isa, device = backend_isa_device
    q, k, v, cu = make_inputs([60, 1, 37, 90], 3, 64, device=device, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            with running_on(backend, isa):
                out = varlen_attention(*leaves, cu, 90)
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
    q, k, v, cu = make_inputs([5, 1, 12], 2, 16, device=device, seed=8)
    cu = cu.long()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    forward, backward, extra = OPS.overloads(backend)  # the ops that run this backend
    with running_on(backend, isa):
        torch.library.opcheck(forward, (*leaves, cu, 12, 0.25, *extra))
        out, lse = forward(q, k, v, cu, 12, 0.25, *extra)
        assert out.is_contiguous() and lse.shape == (18, 2) and lse.dtype == torch.float32
        torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, out, lse, cu, 12, 0.25, *extra))


def test_compile_fullgraph_matches_eager_without_recompiling():
    def loss(q, k, v, cu):
        return varlen_attention(q, k, v, cu, 40).square().sum()

    # dynamic=True: after threshold pruning the packed length T changes from batch to batch.
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1, 2):
            lengths = random_lengths(4, 1, 40, seed)
            lengths[0] = 40
            q, k, v, cu = make_inputs(lengths, 2, 16, seed=seed)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            compiled(*leaves, cu).backward()
            eager = [t.clone().requires_grad_() for t in (q, k, v)]
            loss(*eager, cu).backward()
            for a, b in zip(leaves, eager):
                torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# Dispatch and bad input
# ---------------------------------------------------------------------------------------------


def test_default_backend_on_cpu():
    q, k, v, cu = make_inputs([3, 4], 2, 16)
    from fastvit_kernels.ops.varlen_attention import select_backend

    expected = "cpu" if _native.available() else "reference"
    assert select_backend(q, k, v, cu, 4, 0.25).name == expected


def _bad_inputs():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10])
    return [
        ((q[None], q[None], q[None], cu, 6), "q must be 3-D"),
        ((q, q[:, :1], q, cu, 6), "k.shape must be"),
        ((q, q, q.half(), cu, 6), "v.dtype must be"),
        ((q, q, q, cu.float(), 6), "cu_seqlens.dtype must be"),
        ((q, q, q, cu[None], 6), "cu_seqlens.shape must be"),
        ((q, q, q, cu[:1], 6), "cu_seqlens.shape must be"),
        ((q, q, q, cu, 0), "max_seqlen must be"),
        ((q, q, q, cu, 6.0), "max_seqlen must be"),
        ((q, q, q, torch.tensor([1, 4, 10]), 6), r"cu_seqlens\[0\] must be 0"),
        ((q, q, q, torch.tensor([0, 4, 4, 10]), 6), "strictly increasing"),
        ((q, q, q, torch.tensor([0, 6, 4, 10]), 6), "strictly increasing"),
        ((q, q, q, torch.tensor([0, 4, 9]), 6), r"cu_seqlens\[-1\] must be the number of packed tokens"),
        ((q, q, q, cu, 5), "max_seqlen must be >= the longest segment"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_names_the_argument(case):
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        varlen_attention(*args)
