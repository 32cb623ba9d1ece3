"""fastvit_kernels.QnA against a naive PyTorch QnA layer written from the paper's formulas.

The naive layer below is deliberately the straightforward way: it materialises the keys
(x @ W_k), cuts every window out with F.unfold (zero padding) and masks the out-of-image positions
with -inf from an unfolded ones-image. It shares nothing with fastvit_kernels.reference, and it
has the same parameters (and state_dict) as the module, so both can be loaded with one set of
weights and compared output for output and gradient for gradient.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit_kernels
from fastvit_kernels import QnA


class NaiveQnA(nn.Module):
    def __init__(self, in_dim, dim, heads, num_queries=2, kernel_size=3, stride=1, qkv_bias=False):
        super().__init__()
        self.dim, self.heads, self.Q, self.k, self.s = dim, heads, num_queries, kernel_size, stride
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.wk = nn.Parameter(torch.randn(in_dim, dim))
        self.to_v = nn.Linear(in_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim, bias=qkv_bias)
        self.rpe = nn.Parameter(torch.randn(kernel_size**2, num_queries, heads))
        self.attn_scale = nn.Parameter(torch.randn(kernel_size**2, num_queries, heads))

    def forward(self, x):
        B, H, W, C = x.shape
        h, d, Q, k, s = self.heads, self.dim // self.heads, self.Q, self.k, self.s
        pad = (k - 1) // 2
        q = self.query.reshape(Q, h, d)
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-6) * d**-0.5
        keys = x @ self.wk  # [B, H, W, dim]: materialised on purpose
        values = self.to_v(x)

        def windows(t):  # [B, H, W, dim] -> [B, h, d, k*k, L] (zero outside the image)
            cols = F.unfold(t.permute(0, 3, 1, 2), k, padding=pad, stride=s)
            return cols.view(B, h, d, k * k, -1)

        inside = F.unfold(x.new_ones(1, 1, H, W), k, padding=pad, stride=s).view(k * k, -1) > 0
        logits = torch.einsum("qhd,bhdtl->bqhtl", q, windows(keys))
        logits = logits + self.rpe.permute(1, 2, 0)[None, :, :, :, None]
        logits = logits.masked_fill(~inside, float("-inf"))
        weights = logits.softmax(dim=3) * self.attn_scale.permute(1, 2, 0)[None, :, :, :, None]
        out = torch.einsum("bqhtl,bhdtl->blhd", weights, windows(values))
        Ho, Wo = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1
        return self.to_out(out.reshape(B, Ho, Wo, self.dim))


def make_pair(in_dim, dim, heads, Q, k, s, dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    module = QnA(in_dim, dim, heads, num_queries=Q, kernel_size=k, stride=s, qkv_bias=bias).to(dtype)
    with torch.no_grad():  # non-trivial position parameters (they start at zeros / ~0.02)
        module.rpe.normal_(0, 1.0)
        module.attn_scale.normal_(0, 1.0)
        if bias:
            module.to_v.bias.normal_()
            module.to_out.bias.normal_()
    naive = NaiveQnA(in_dim, dim, heads, Q, k, s, qkv_bias=bias).to(dtype)
    naive.load_state_dict(module.state_dict(), strict=True)
    return module, naive


CASES = [
    # (B, H, W, in_dim, dim, heads, Q, k, stride)
    (2, 6, 6, 8, 8, 2, 2, 3, 1),
    (2, 7, 5, 8, 16, 4, 2, 3, 2),  # non-square, odd sizes, in_dim != dim, strided
    (1, 9, 12, 12, 12, 3, 1, 7, 1),
    (2, 8, 11, 6, 8, 2, 3, 7, 2),
    (2, 5, 4, 8, 8, 2, 2, 1, 1),  # k = 1: one key per output
    (1, 6, 7, 8, 8, 4, 2, 1, 2),
    (2, 3, 2, 8, 8, 2, 2, 7, 1),  # image smaller than the window
    (1, 2, 3, 8, 8, 2, 2, 7, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_c{}-{}_h{}_Q{}_k{}_s{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_naive(case, dtype):
    B, H, W, in_dim, dim, heads, Q, k, s = case
    module, naive = make_pair(in_dim, dim, heads, Q, k, s, dtype, bias=(k == 3))
    x = torch.randn(B, H, W, in_dim, dtype=dtype)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out, expected = module(x1), naive(x2)
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    assert out.shape == (B, Ho, Wo, dim)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out, expected, **tol)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    naive_grads = dict(naive.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, naive_grads[name].grad, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_state_dict_layout():
    m = QnA(32, 64, 8, num_queries=2, kernel_size=3)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "query": (2, 64),
        "wk": (32, 64),
        "to_v.weight": (64, 32),
        "to_out.weight": (64, 64),
        "rpe": (9, 2, 8),
        "attn_scale": (9, 2, 8),
    }
    assert torch.equal(m.rpe, torch.zeros_like(m.rpe))  # zero init, as the JAX model
    assert 0.01 < m.attn_scale.std().item() < 0.03
    assert m.query.abs().max().item() <= 2 * (1 / 8) ** 0.5 + 1e-6  # truncated at 2 std


def test_exported_from_package():
    assert fastvit_kernels.QnA is QnA
    assert fastvit_kernels.modules.QnA is QnA


def test_score_and_value_come_from_one_matmul():
    """cost and v are views of one projection: the op gets them without copies."""
    m = QnA(8, 8, 2)
    seen = {}
    real = fastvit_kernels.modules.qna.qna_attention

    def spy(cost, v, *args, **kwargs):
        seen["cost"], seen["v"] = cost, v
        return real(cost, v, *args, **kwargs)

    fastvit_kernels.modules.qna.qna_attention = spy
    try:
        m(torch.randn(1, 4, 5, 8))
    finally:
        fastvit_kernels.modules.qna.qna_attention = real
    cost, v = seen["cost"], seen["v"]
    assert cost.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert v.stride()[:3] == cost.stride()[:3] and v.stride(2) == 8 + 2 * 2
    assert not cost.is_contiguous() and not v.is_contiguous()


def test_bad_inputs():
    m = QnA(8, 16, 4)
    with pytest.raises(ValueError, match=r"channels-last image \[B, H, W, C=8\].*3-D"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"C=8.*\(2, 8, 5, 5\)"):
        m(torch.randn(2, 8, 5, 5))  # channels-first by mistake
    with pytest.raises(ValueError, match="divisible by heads"):
        QnA(8, 10, 4)
    with pytest.raises(ValueError, match="odd"):
        QnA(8, 8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="stride"):
        QnA(8, 8, 2, stride=0)
