"""The ops are real PyTorch ops: opcheck passes, torch.compile(fullgraph=True) has no graph break
and does not recompile for new inputs of the same shapes."""

import pytest
import torch

from fastvit_kernels.ops import bias_attention
from fastvit_kernels.reference import bias_attention as reference
from helpers import backend_params, running_on
from test_bias_attention import make_inputs

from fastvit_kernels.ops.bias_attention import OPS as BIAS_OPS
from fastvit_kernels.ops.qna_attention import OPS as QNA_OPS


@pytest.mark.parametrize("backend_isa_device", backend_params())
@pytest.mark.parametrize("activation", ["none", "hardswish", "silu"])
def test_opcheck(backend_isa_device, activation):
    backend, isa, device = backend_isa_device
    torch.manual_seed(0)
    q, k, v, table, index = make_inputs(2, 3, 7, 9, 16, 32, device=device, layout="shrink")
    leaves = [t.detach().requires_grad_() for t in (q, k, v, table)]
    forward, backward, extra = BIAS_OPS.overloads(backend)  # the ops that run this backend
    with running_on(backend, isa):
        torch.library.opcheck(forward, (*leaves[:3], leaves[3], index, None, 0.25, activation, True, *extra))
        torch.library.opcheck(forward, (q, k, v, None, None, None, 0.25, activation, False, *extra))
        out, o_pre, lse = forward(q, k, v, table, index, None, 0.25, activation, True, *extra)
        saved = out if activation == "none" else o_pre
        grad = torch.randn_like(out)
        torch.library.opcheck(backward, (grad, q, k, v, table, index, None, saved, lse, 0.25, activation, *extra))


def test_compile_fullgraph_matches_eager_without_recompiling():
    torch._dynamo.reset()
    B, H, N, Dk, Dv = 2, 4, 49, 16, 32

    def block(q, k, v, table, index):
        out = bias_attention(q, k, v, table, index, activation="hardswish")
        return out.transpose(1, 2).reshape(B, N, H * Dv).square().mean()

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second call must reuse the first graph
            torch.manual_seed(seed)
            inputs = make_inputs(B, H, N, N, Dk, Dv, layout="fused")
            eager_leaves = [t.detach().requires_grad_() for t in inputs[:4]]
            compiled_leaves = [t.detach().requires_grad_() for t in inputs[:4]]
            expected = block(*eager_leaves, inputs[4])
            expected.backward()
            got = compiled(*compiled_leaves, inputs[4])
            got.backward()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for a, b in zip(compiled_leaves, eager_leaves):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_reference_is_exportable():
    """The reference is plain tensor code: the path for users who export (torch.export, ONNX)."""
    torch.manual_seed(0)
    q, k, v, table, index = make_inputs(1, 2, 7, 7, 8, 16, layout="contiguous")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("index", index)

        def forward(self, a, b, c, t):
            return reference.bias_attention(a, b, c, t, self.index, None, "hardswish")

    exported = torch.export.export(Block(), (q, k, v, table))
    expected = reference.bias_attention(q, k, v, table, index, None, "hardswish")
    torch.testing.assert_close(exported.module()(q, k, v, table), expected)


@pytest.mark.parametrize("use_conv", [False, True], ids=["linear", "conv"])
def test_patched_timm_model_compiles_fullgraph(use_conv):
    """A whole patched timm LeViT traces as one graph (forward and backward, no graph break)."""
    timm = pytest.importorskip("timm")
    import fastvit_kernels

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("levit_conv_128s" if use_conv else "levit_128s", pretrained=False)
    for module in model.modules():
        if hasattr(module, "attention_biases"):
            torch.nn.init.normal_(module.attention_biases, std=2.0)
    fastvit_kernels.patch_timm(model)
    x = torch.randn(2, 3, 224, 224)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# qna_attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_isa_device", backend_params())
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_qna_opcheck(backend_isa_device, k, stride):
    from test_qna_attention import make_inputs as make_qna_inputs

    backend, isa, device = backend_isa_device
    torch.manual_seed(0)
    cost, v, rpe, attn_scale = make_qna_inputs(2, 5, 4, 2, 3, 8, k, device=device, param_dtype=torch.float32)
    leaves = [t.detach().requires_grad_() for t in (cost, v, rpe, attn_scale)]
    forward, backward, extra = QNA_OPS.overloads(backend)  # the ops that run this backend
    with running_on(backend, isa):
        torch.library.opcheck(forward, (*leaves, k, stride, *extra))
        out, lse = forward(cost, v, rpe, attn_scale, k, stride, *extra)
        torch.library.opcheck(backward, (torch.randn_like(out), cost, v, rpe, attn_scale, lse, k, stride, *extra))


def test_qna_compile_fullgraph_matches_eager_without_recompiling():
    from fastvit_kernels.ops import qna_attention
    from test_qna_attention import make_inputs as make_qna_inputs

    torch._dynamo.reset()

    def layer(cost, v, rpe, attn_scale):
        out = qna_attention(cost, v, rpe, attn_scale, kernel_size=3, stride=2)
        return out.flatten(-2).square().mean()

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):  # the second call must reuse the first graph
            torch.manual_seed(seed)
            inputs = make_qna_inputs(2, 7, 6, 2, 4, 8, 3)
            eager_leaves = [t.detach().requires_grad_() for t in inputs]
            compiled_leaves = [t.detach().requires_grad_() for t in inputs]
            expected = layer(*eager_leaves)
            expected.backward()
            got = compiled(*compiled_leaves)
            got.backward()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            for a, b in zip(compiled_leaves, eager_leaves):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
