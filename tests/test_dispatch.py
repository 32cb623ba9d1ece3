"""How the ops reach their kernels (ops/_library.py): the C++ kernels are dispatcher ops with the
same schema as their Python twins, the backend is chosen once per call and the backward runs on
the forward's backend, and constant inputs are not re-processed on every call."""

import pytest
import torch

import fastvit_kernels
from fastvit_kernels import _native
from fastvit_kernels.ops import bias_attention, ggem_pool, policy_attention, qna_attention, varlen_attention
from fastvit_kernels.reference import bias_attention as bias_reference

OP_MODULES = {
    "bias_attention": bias_attention.__module__,
    "qna_attention": qna_attention.__module__,
    "policy_attention": policy_attention.__module__,
    "varlen_attention": varlen_attention.__module__,
    "ggem_pool": ggem_pool.__module__,
}
native = pytest.mark.skipif(not _native.available(), reason=f"native extension not built: {_native.load_error}")


def _ops(name):
    import importlib

    return importlib.import_module(OP_MODULES[name]).OPS


@native
@pytest.mark.parametrize("name", list(OP_MODULES))
def test_native_and_python_ops_share_the_schema(name):
    """The C++ registration (csrc/ops/<op>.cpp) and the Python twin declare the same arguments;
    the twin only adds the backend's name."""
    ops = _ops(name)
    for native_op, python_op in ((ops.native_forward, ops.python_forward), (ops.native_backward, ops.python_backward)):
        native_args = [(a.name, str(a.type)) for a in native_op._schema.arguments]
        python_args = [(a.name, str(a.type)) for a in python_op._schema.arguments]
        assert python_args == native_args + [("backend", "str")]
        assert [str(r.type) for r in native_op._schema.returns] == [str(r.type) for r in python_op._schema.returns]


def _bias_inputs(requires_grad=True):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=requires_grad) for _ in range(3))
    table = torch.randn(3, 9, requires_grad=requires_grad)
    index = torch.randint(0, 9, (7, 7))
    return q, k, v, table, index


@pytest.mark.parametrize("forward_backend", ["reference"] + (["cpu"] if _native.available() else []))
def test_backward_runs_on_the_forward_backend(monkeypatch, forward_backend):
    """A backward that runs outside the forward's use_backend block (or in autograd's own thread,
    as on CUDA) still uses the forward's backend."""
    calls = []
    original = bias_reference.backward
    monkeypatch.setattr(bias_reference, "backward", lambda *args: calls.append(1) or original(*args))
    q, k, v, table, index = _bias_inputs()
    with fastvit_kernels.use_backend(forward_backend):
        out = bias_attention(q, k, v, table, index, activation="hardswish")
    other = "cpu" if forward_backend == "reference" else "reference"
    with fastvit_kernels.use_backend(other if _native.available() else None):
        out.square().sum().backward()
    assert len(calls) == (1 if forward_backend == "reference" else 0)
    assert all(t.grad is not None for t in (q, k, v, table))


def test_nothing_is_saved_without_grad():
    q, k, v, table, index = _bias_inputs()
    with torch.no_grad():
        out = bias_attention(q, k, v, table, index, activation="hardswish")
    assert out.grad_fn is None
    with torch.inference_mode():
        out = bias_attention(*(t.detach() for t in (q, k, v, table)), index)
    assert out.grad_fn is None


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _native.available() else []))
def test_in_place_updates_of_table_and_index_are_seen(backend):
    """Table and index are cached per version (csrc/ops/bias_attention.cpp, ops/bias_attention.py):
    an in-place update, like an optimizer step, must reach the next call."""
    q, k, v, table, index = (t.detach() for t in _bias_inputs(requires_grad=False))

    def expected():
        return bias_reference.bias_attention(q.double(), k.double(), v.double(), table.double(), index.clone())

    with fastvit_kernels.use_backend(backend):
        for update in (lambda: None, lambda: table.mul_(-3).add_(1), lambda: index.copy_(index.flip(1))):
            update()
            got = bias_attention(q, k, v, table, index)
            torch.testing.assert_close(got.double(), expected(), rtol=1e-5, atol=1e-6)
        index.fill_(9)  # out of range: a cached check must not hide it
        with pytest.raises(IndexError, match=r"bias_index values must be in \[0, T=9\)"):
            bias_attention(q, k, v, table, index)


def test_inference_tensors_are_not_cached():
    q, k, v, table, index = (t.detach() for t in _bias_inputs(requires_grad=False))
    with torch.inference_mode():
        t1 = table.clone()
        first = bias_attention(q, k, v, t1, index)
        t1.mul_(-3)  # (a constant shift would not change a softmax)
        second = bias_attention(q, k, v, t1, index)
    want = bias_reference.bias_attention(q.double(), k.double(), v.double(), table.double() * -3, index)
    torch.testing.assert_close(second.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)
