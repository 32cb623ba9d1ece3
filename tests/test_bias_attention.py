"""bias_attention: every backend vs a float64 oracle, layouts, dtypes, dispatch and bad input."""

import os

import pytest
import torch

import fastvit_kernels
from fastvit_kernels import _native
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.ops.bias_attention import OPS
from fastvit_kernels.reference import bias_attention as reference
from helpers import assert_matches, backend_params, is_interpreted, running_on

BACKENDS = backend_params()


def levit_index(rows, cols, stride=1):
    """timm's LeViT index: |Δy|·cols + |Δx| between (strided) query and key grid positions."""
    ky, kx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    qy, qx = torch.meshgrid(torch.arange(0, rows, stride), torch.arange(0, cols, stride), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs()
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs()
    return dy * cols + dx


def make_inputs(B, H, Nq, Nk, Dk, Dv, dtype=torch.float32, device="cpu", layout="fused",
                bias="table", table_dtype=None, index_dtype=torch.int64):
    """Fresh random inputs. Layouts: 'fused' (LeViT's per-head views of one qkv buffer; Nq == Nk),
    'shrink' (fused kv, separate q), 'conv' (channel-major views: last-dim stride != 1),
    'contiguous'."""
    g = dict(dtype=dtype, device=device)
    if layout == "fused":
        assert Nq == Nk
        qkv = torch.randn(B, Nq, H, 2 * Dk + Dv, **g)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([Dk, Dk, Dv], dim=3))
    elif layout == "shrink":
        kv = torch.randn(B, Nk, H, Dk + Dv, **g)
        k, v = (t.transpose(1, 2) for t in kv.split([Dk, Dv], dim=3))
        q = torch.randn(B, Nq, H, Dk, **g).transpose(1, 2)
    elif layout == "conv":
        q = torch.randn(B, H, Dk, Nq, **g).transpose(2, 3)
        kv = torch.randn(B, H, Dk + Dv, Nk, **g)
        k, v = (t.transpose(2, 3) for t in kv.split([Dk, Dv], dim=2))
    else:
        q, k, v = torch.randn(B, H, Nq, Dk, **g), torch.randn(B, H, Nk, Dk, **g), torch.randn(B, H, Nk, Dv, **g)
    table = index = None
    if bias == "table":
        T = max(Nk, 3)
        # Trained LeViT biases are large (std ~5): they must dominate some rows.
        table = (4 * torch.randn(H, T, dtype=table_dtype or dtype, device=device))
        index = torch.randint(0, T, (Nq, Nk), device=device, dtype=index_dtype)
    return q, k, v, table, index


def run_and_compare(backend, isa, q, k, v, table, index, activation, scale=None, mask=None,
                    table_view=None):
    """Forward and backward through the op on one backend vs the float64 oracle. table_view(t)
    is what the op gets instead of the table leaf t (e.g. Swin's [T, H] storage, transposed)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    table_leaf = table.detach().clone().requires_grad_() if table is not None else None
    table_arg = table_view(table_leaf) if table_view is not None else table_leaf
    with running_on(backend, isa):
        out = bias_attention(*leaves, table_arg, index, mask=mask, scale=scale, activation=activation)
        grad = torch.randn_like(out)
        out.backward(grad)

    def oracle_of(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        tab = table.detach().to(dtype).requires_grad_() if table is not None else None
        tab_arg = table_view(tab) if table_view is not None else tab
        o = reference.bias_attention(*xs, tab_arg, index, scale, activation, mask)
        o.backward(grad.to(dtype))
        return o, [x.grad for x in xs] + ([tab.grad] if tab is not None else [])

    ref_out, ref_grads = oracle_of(torch.float64)
    low_out, low_grads = oracle_of(q.dtype) if q.dtype != torch.float32 else (None, [None] * 4)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out [B, Nq, H, Dv]"
    assert_matches("out", out, ref_out, low_out)
    names = ["dq", "dk", "dv", "dtable"]
    got_grads = [x.grad for x in leaves] + ([table_leaf.grad] if table is not None else [])
    for name, got, ref, low in zip(names, got_grads, ref_grads, low_grads):
        assert got.dtype == (table.dtype if name == "dtable" else q.dtype), name
        assert_matches(name, got, ref, low, dtype=q.dtype)


def swin_shift_mask(windows, Nq, Nk, device="cpu", dtype=torch.float32, seed=0):
    """A mask like Swin's shifted windows: tokens carry region labels, pairs from different
    regions get -100, the same region 0 (so each query keeps at least one key when Nq <= Nk)."""
    g = torch.Generator().manual_seed(seed)
    labels_q = torch.randint(0, 3, (windows, Nq), generator=g)
    labels_k = torch.randint(0, 3, (windows, Nk), generator=g)
    labels_k[:, :Nq] = labels_q[:, :Nk]
    mask = (labels_q[:, :, None] != labels_k[:, None, :]).to(dtype) * -100.0
    return mask.to(device)


def swin_inputs(windows, images, H, N, D, dtype=torch.float32, device="cpu"):
    """q, k, v as Swin's qkv projection lays them out ([B·W, N, 3, H, D] permuted), a table
    stored [T, H] and Swin's relative-position index for a square window of N tokens."""
    w = int(N ** 0.5)
    qkv = torch.randn(images * windows, N, 3, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    table_th = 2 * torch.randn((2 * w - 1) ** 2, H, dtype=dtype, device=device)
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (w - 1)
    index = (rel[0] * (2 * w - 1) + rel[1]).to(device)
    return q, k, v, table_th, index


def small_batch(backend, device, N):
    # The Triton interpreter runs each program in numpy: keep B·H small at large N.
    if is_interpreted(backend, device) and N > 64:
        return 1, 2
    return 2, 3


SIZES = [(1, 1), (7, 7), (16, 16), (49, 49), (50, 50), (196, 196), (197, 197), (256, 256),
         (49, 196), (16, 49), (7, 50), (1, 7), (197, 1), (50, 16)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Nq,Nk", SIZES, ids=[f"{a}x{b}" for a, b in SIZES])
def test_token_counts(backend_isa_device, Nq, Nk):
    backend, isa, device = backend_isa_device
    torch.manual_seed(Nq * 1000 + Nk)
    B, H = small_batch(backend, device, max(Nq, Nk))
    layout = "fused" if Nq == Nk else "shrink"
    inputs = make_inputs(B, H, Nq, Nk, 16, 32, device=device, layout=layout)
    run_and_compare(backend, isa, *inputs, activation="hardswish")


MASK_CASES = [  # (windows W, images, H, Nq, Nk, Dk, Dv, with a table)
    (4, 2, 3, 49, 49, 32, 32, True),    # Swin-T stage 3 windows, shifted
    (1, 3, 2, 16, 16, 16, 16, True),    # one window per image
    (7, 1, 2, 7, 50, 16, 32, True),     # Nq != Nk, odd sizes
    (2, 2, 2, 49, 49, 16, 16, False),   # a mask without a table
]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("case", MASK_CASES, ids=[f"W{c[0]}-{c[3]}x{c[4]}-{'table' if c[7] else 'notable'}" for c in MASK_CASES])
def test_mask(backend_isa_device, case):
    """mask[b % W] joins the scores; the table stored [T, H] is passed as a transposed view."""
    backend, isa, device = backend_isa_device
    W, images, H, Nq, Nk, Dk, Dv, with_table = case
    torch.manual_seed(W * 100 + Nq)
    mask = swin_shift_mask(W, Nq, Nk, device=device, seed=Nk)
    if Nq == Nk and Dk == Dv and with_table:
        q, k, v, table_th, index = swin_inputs(W, images, H, Nq, Dk, device=device)
        run_and_compare(backend, isa, q, k, v, table_th, index, None, mask=mask,
                        table_view=lambda t: t.t())
    else:
        q, k, v, table, index = make_inputs(W * images, H, Nq, Nk, Dk, Dv, device=device,
                                            layout="shrink", bias="table" if with_table else None)
        run_and_compare(backend, isa, q, k, v, table, index, "hardswish", mask=mask)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", ["inputs", "float32"])
def test_mask_half_precision(backend_isa_device, dtype, mask_dtype):
    backend, isa, device = backend_isa_device
    torch.manual_seed(3)
    q, k, v, table_th, index = swin_inputs(4, 2, 3, 49, 32, dtype=dtype, device=device)
    mask = swin_shift_mask(4, 49, 49, device=device, dtype=dtype if mask_dtype == "inputs" else torch.float32)
    run_and_compare(backend, isa, q, k, v, table_th, index, None, mask=mask, table_view=lambda t: t.t())


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_mask_updated_in_place_is_seen(backend_isa_device):
    """The C++ backend caches the dense bias and mask rows per tensor version: an in-place change
    of the mask (or a new mask object) must reach the next call."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(4)
    q, k, v, table_th, index = swin_inputs(2, 1, 2, 16, 16, device=device)
    mask = swin_shift_mask(2, 16, 16, device=device)
    first_mask = mask.clone()
    with running_on(backend, isa), torch.no_grad():
        first = bias_attention(q, k, v, table_th.t(), index, mask=mask)
        mask[1].copy_(-2 * torch.rand(16, 16, device=device))
        second = bias_attention(q, k, v, table_th.t(), index, mask=mask)
        without = bias_attention(q, k, v, table_th.t(), index)
    for got, m in ((first, first_mask), (second, mask), (without, None)):
        want = reference.bias_attention(q.double(), k.double(), v.double(), table_th.t().double(), index,
                                        None, None, None if m is None else m.double())
        assert_matches("out", got, want)
    assert not torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_mask_of_minus_infinity(backend_isa_device):
    """-inf entries (another common way to write a mask) may hide all of a row's keys in whole key
    blocks (the Triton forward's online softmax must not subtract -inf from -inf) or all keys
    but one: the results stay finite and match the oracle."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(5)
    q, k, v, table, index = make_inputs(4, 2, 50, 50, 16, 32, device=device, layout="shrink")
    mask = torch.zeros(2, 50, 50)
    mask[0, :, :40] = float("-inf")  # window 0: keys 40 to 49 only, after a hidden key block
    mask[1, :, :-1] = float("-inf")  # window 1: the last key alone
    mask[1, ::2] = 0.0               # (on every other row)
    run_and_compare(backend, isa, q, k, v, table, index, "hardswish", mask=mask.to(device))


WIDTHS = [(Dk, Dv) for Dk in (8, 16, 32, 64) for Dv in (16, 32, 64, 128)]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("Dk,Dv", WIDTHS, ids=[f"dk{a}-dv{b}" for a, b in WIDTHS])
def test_head_widths(backend_isa_device, Dk, Dv):
    backend, isa, device = backend_isa_device
    torch.manual_seed(Dk * 1000 + Dv)
    inputs = make_inputs(2, 2, 49, 50, Dk, Dv, device=device, layout="contiguous")
    run_and_compare(backend, isa, *inputs, activation=None)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "hardswish", "silu"])
@pytest.mark.parametrize("bias", ["table", "fp32-table", "none"])
def test_dtypes(backend_isa_device, dtype, activation, bias):
    backend, isa, device = backend_isa_device
    torch.manual_seed(7)
    B, H = small_batch(backend, device, 197)
    inputs = make_inputs(B, H, 197, 197, 16, 32, dtype=dtype, device=device, layout="fused",
                         bias="none" if bias == "none" else "table",
                         table_dtype=torch.float32 if bias == "fp32-table" else None)
    run_and_compare(backend, isa, *inputs, activation=activation)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("layout", ["fused", "shrink", "conv", "contiguous"])
@pytest.mark.parametrize("activation", ["hardswish", "silu"])
def test_layouts(backend_isa_device, layout, activation):
    backend, isa, device = backend_isa_device
    torch.manual_seed(11)
    Nq, Nk = (49, 49) if layout == "fused" else (16, 49)
    inputs = make_inputs(2, 4, Nq, Nk, 16, 64, device=device, layout=layout, index_dtype=torch.int32)
    run_and_compare(backend, isa, *inputs, activation=activation, scale=0.3)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("activation", ["hardswish", "silu"])
def test_real_levit_index_and_large_bias(backend_isa_device, activation):
    """LeViT's own index pattern (14×14 grid, and the stride-2 shrink grid) with large biases
    (SiLU: levit_*d, levit_512*, *_s8; Hardswish: the others)."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(3)
    B, H = small_batch(backend, device, 196)
    for rows, cols, stride in ((14, 14, 1), (14, 14, 2), (7, 5, 2)):
        index = levit_index(rows, cols, stride).to(device)
        Nq, Nk = index.shape
        q, k, v, _, _ = make_inputs(B, H, Nq, Nk, 16, 32, device=device, layout="contiguous", bias="none")
        table = 8 * torch.randn(H, rows * cols, device=device)
        run_and_compare(backend, isa, q, k, v, table, index, activation=activation)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_epilogue_elementwise(backend_isa_device, dtype):
    """With one query and one key, P = 1 and O = v exactly, so out = silu(v) and dv = grad ·
    silu'(v) test the fused epilogue element by element over [-120, 120]: both tails (exp(-x)
    beyond fp32's range below -88.7, 0 above 87.3), the zero of silu' near -1.28, and 0."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(13)
    specials = torch.tensor([-88.8, -88.37, -87.3, -1.2785, 0.0])
    x = torch.cat([torch.linspace(-120, 120, 8 * 256 - specials.numel()), specials])
    v = x.to(dtype).reshape(8, 1, 1, 256)  # [B, H, Nk, Dv]: 8 batches of one key
    q, k = (torch.randn(8, 1, 1, 16, dtype=dtype) for _ in range(2))
    grad = (1 + torch.rand(8, 1, 1, 256)).to(dtype)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    with running_on(backend, isa):
        out = bias_attention(*leaves, activation="silu")
        out.backward(grad.to(device))
    xd, gd = v.double(), grad.double()
    s = torch.sigmoid(xd)
    # fp32: a few ulp. bf16 / fp16: the rounding of the fp32 result to the dtype (half an ulp),
    # a whole ulp in Triton's interpreter, whose float32 -> bfloat16 conversion truncates.
    rtol = {torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}[dtype]
    if dtype == torch.bfloat16 and is_interpreted(backend, device):
        rtol = 2 ** -7
    for name, got, want in (("out", out, xd * s), ("dv", leaves[2].grad, gd * s * (1 + xd * (1 - s)))):
        got = got.detach().cpu().double()
        error = (got - want).abs()
        # An absolute floor where the value is ~0: silu' crosses 0 near -1.28 (its fp32 formula
        # cancels there) and silu underflows in the far negative tail.
        allowed = rtol * want.abs() + 1e-6 * gd
        worst = (error - allowed).argmax()
        assert bool((error <= allowed).all()), (
            f"{name}: at x = {xd.flatten()[worst].item()}: got {got.flatten()[worst].item()}, "
            f"want {want.flatten()[worst].item()}")


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_non_contiguous_grad_and_inference(backend_isa_device):
    """The output gradient may come in any layout; without grad no pre-activation is kept."""
    backend, isa, device = backend_isa_device
    torch.manual_seed(5)
    q, k, v, table, index = make_inputs(2, 3, 16, 16, 16, 32, device=device)
    with running_on(backend, isa):
        with torch.no_grad():
            out_nograd = bias_attention(q, k, v, table, index, activation="hardswish")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = bias_attention(*leaves, table, index, activation="hardswish")
        torch.testing.assert_close(out, out_nograd, rtol=0, atol=0)
        # A gradient produced by a transpose of a [B, Dv, H, Nq] tensor: every stride unusual.
        grad = torch.randn(2, 32, 3, 16, device=device).permute(0, 2, 3, 1)
        out.backward(grad)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.bias_attention(*xs, table.double(), index, None, "hardswish")
    ref.backward(grad.double())
    for name, got, x in zip("qkv", leaves, xs):
        assert_matches(f"d{name}", got.grad, x.grad)


@pytest.mark.parametrize("activation", ["none", "hardswish", "silu"])
def test_explicit_reference_backward_matches_autograd(activation):
    """The written-out backward formulas (what the kernels implement) vs autograd, in float64."""
    torch.manual_seed(0)
    q, k, v, table, index = make_inputs(2, 3, 9, 13, 8, 16, dtype=torch.float64, layout="contiguous")
    q, k, v, table = (t.detach() for t in (q, k, v, table))
    xs = [t.clone().requires_grad_() for t in (q, k, v, table)]
    out = reference.bias_attention(*xs[:3], xs[3], index, 0.4, activation)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_b, o_pre, lse = reference.forward(q, k, v, table, index, None, 0.4, activation, True)
    torch.testing.assert_close(out_b, out.detach(), rtol=1e-12, atol=1e-14)
    saved = out_b if activation == "none" else o_pre
    grads = reference.backward(grad, q, k, v, table, index, None, saved, lse, 0.4, activation)
    for got, x in zip(grads, xs):
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    """The autograd glue (custom op + register_autograd) is exact, checked numerically."""
    torch.manual_seed(1)
    q, k, v, table, index = make_inputs(1, 2, 5, 7, 4, 6, dtype=torch.float64, layout="contiguous")
    xs = [t.requires_grad_() for t in (q, k, v, table)]
    assert torch.autograd.gradcheck(lambda a, b, c, t: bias_attention(a, b, c, t, index, activation="hardswish"), xs)
    assert torch.autograd.gradcheck(lambda a, b, c, t: bias_attention(a, b, c, t, index, activation="silu"), xs)
    assert torch.autograd.gradcheck(lambda a, b, c: bias_attention(a, b, c), xs[:3])


def test_half_precision_large_scores_stay_finite():
    """Scores far beyond fp16's exp range: statistics in fp32, no inf/NaN."""
    torch.manual_seed(2)
    q, k, v, table, index = make_inputs(2, 2, 49, 49, 16, 32, dtype=torch.float16)
    table = (table.float() * 10).half()  # biases up to ~150
    out = bias_attention(q * 4, k * 4, v, table, index, activation="hardswish")
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_native_is_built_when_required():
    """CI builds the extension and sets FASTVIT_KERNELS_REQUIRE_NATIVE=1: a silent fallback there
    would leave the C++ kernels untested."""
    if os.environ.get("FASTVIT_KERNELS_REQUIRE_NATIVE") != "1":
        pytest.skip("FASTVIT_KERNELS_REQUIRE_NATIVE is not set")
    assert _native.available(), _native.load_error
    from fastvit_kernels.ops.bias_attention import select_backend
    q = torch.randn(1, 1, 4, 16)
    assert select_backend(q, q, q).name == "cpu"


def test_forced_backend_refusal_names_the_reason():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)  # float64 runs on the reference only
    with fastvit_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="'cpu' cannot run.*float64"):
        bias_attention(q, q, q)


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with fastvit_kernels.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTVIT_KERNELS_BACKEND", "gpu")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="FASTVIT_KERNELS_BACKEND"):
        bias_attention(q, q, q)


def test_env_var_forces_reference(monkeypatch):
    from fastvit_kernels.ops.bias_attention import select_backend
    monkeypatch.setenv("FASTVIT_KERNELS_BACKEND", "reference")
    q = torch.randn(1, 1, 4, 16)
    assert select_backend(q, q, q).name == "reference"


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, the expected and the given value
# ---------------------------------------------------------------------------------------------


def _good():
    q, k, v, table, index = make_inputs(2, 3, 7, 9, 8, 16, layout="contiguous")
    return dict(q=q, k=k, v=v, bias_table=table, bias_index=index)


def _call(**kw):
    kw = {**_good(), **kw}
    extra = {name: kw.pop(name) for name in ("scale", "activation", "mask") if name in kw}
    return bias_attention(kw["q"], kw["k"], kw["v"], kw["bias_table"], kw["bias_index"], **extra)


BAD = [
    ("q rank", dict(q=torch.randn(3, 7, 8)), ValueError, r"q must be 4-D .*got 3-D"),
    ("k rank", dict(k=torch.randn(2, 3, 9, 8, 1)), ValueError, r"k must be 4-D"),
    ("batch", dict(k=torch.randn(1, 3, 9, 8)), ValueError, r"k.shape\[:2\] \(B, H\) must be \(2, 3\).*got \(1, 3\)"),
    ("heads", dict(v=torch.randn(2, 4, 9, 16)), ValueError, r"v.shape\[:2\].*got \(2, 4\)"),
    ("Dk", dict(k=torch.randn(2, 3, 9, 4)), ValueError, r"k.shape\[3\] \(Dk\) must be 8 .*got 4"),
    ("Nk", dict(v=torch.randn(2, 3, 8, 16)), ValueError, r"v.shape\[2\] \(Nk\) must be 9.*got 8"),
    ("dtype mix", dict(k=torch.randn(2, 3, 9, 8, dtype=torch.float16)), ValueError, r"k.dtype must be q's dtype"),
    ("int q", dict(q=torch.ones(2, 3, 7, 8, dtype=torch.int32)), ValueError, r"q must be of dtype float32"),
    ("index shape", dict(bias_index=torch.zeros(9, 7, dtype=torch.long)), ValueError, r"bias_index.shape must be \[Nq=7, Nk=9\].*\[9, 7\]"),
    ("index float", dict(bias_index=torch.zeros(7, 9)), ValueError, r"bias_index.dtype must be torch.int64 or torch.int32.*float32"),
    ("index range", dict(bias_index=torch.full((7, 9), 9)), IndexError, r"bias_index values must be in \[0, T=9\).*9 to 9"),
    ("index negative", dict(bias_index=torch.full((7, 9), -1)), IndexError, r"bias_index values .*-1 to -1"),
    ("table heads", dict(bias_table=torch.randn(4, 9)), ValueError, r"bias_table.shape must be \[H=3, T>=1\].*\[4, 9\]"),
    ("table rank", dict(bias_table=torch.randn(3, 9, 1)), ValueError, r"bias_table must be a 2-D tensor"),
    ("table dtype", dict(bias_table=torch.randn(3, 9, dtype=torch.float64)), ValueError, r"bias_table.dtype"),
    ("half table", dict(bias_table=None), ValueError, r"bias_table and bias_index must be both given or both None"),
    ("activation", dict(activation="gelu"), ValueError,
     r"activation must be one of \(None, 'hardswish', 'silu'\), got 'gelu'"),
    ("activation 'none'", dict(activation="none"), ValueError,
     r"activation must be one of \(None, 'hardswish', 'silu'\), got 'none'"),
    ("scale", dict(scale=float("nan")), ValueError, r"scale must be None or a finite float"),
    ("mask rank", dict(mask=torch.zeros(7, 9)), ValueError, r"mask must be a 3-D tensor \[W, Nq, Nk\].*2-D"),
    ("mask shape", dict(mask=torch.zeros(2, 9, 7)), ValueError, r"mask.shape must be \[W>=1, Nq=7, Nk=9\].*\[2, 9, 7\]"),
    ("mask windows", dict(mask=torch.zeros(3, 7, 9)), ValueError, r"q.shape\[0\] \(B\) must be a multiple of the mask's window count W=3, got 2"),
    ("mask dtype", dict(mask=torch.zeros(2, 7, 9, dtype=torch.float64)), ValueError, r"mask.dtype must be q's dtype"),
    ("mask grad", dict(mask=torch.zeros(2, 7, 9, requires_grad=True)), ValueError, r"mask must be a constant"),
    ("empty keys", dict(k=torch.randn(2, 3, 0, 8), v=torch.randn(2, 3, 0, 16), bias_table=None, bias_index=None),
     ValueError, r"Nk\) must be at least 1"),
]


@pytest.mark.parametrize("case,kwargs,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(**kwargs)


@pytest.mark.parametrize("backend_isa_device", BACKENDS)
def test_unknown_activation_at_the_op_level(backend_isa_device):
    """The dispatcher ops take the activation as a string ("none", "hardswish", "silu"): every
    backend rejects another one, forward and backward, naming the argument and the allowed values."""
    backend, isa, device = backend_isa_device
    q, k, v, table, index = make_inputs(1, 2, 5, 5, 16, 16, device=device)
    forward, backward, extra = OPS.overloads(backend)
    message = r"activation must be one of .*'none'.*'hardswish'.*'silu'.*got 'gelu'"
    with running_on(backend, isa):
        out, o_pre, lse = forward(q, k, v, table, index, None, 0.25, "silu", True, *extra)
        with pytest.raises(ValueError, match=message):
            forward(q, k, v, table, index, None, 0.25, "gelu", True, *extra)
        with pytest.raises(ValueError, match=message):
            backward(torch.randn_like(out), q, k, v, table, index, None, o_pre, lse, 0.25, "gelu", *extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"k.device must be q's device"):
        _call(k=torch.randn(2, 3, 9, 8, device="cuda"))
