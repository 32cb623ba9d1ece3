"""Attention with a learned relative-position bias (LeViT attention and shrink attention).

Order of this file (the same in every op file):
  1. the public function and its input checks,
  2. the dispatcher ops' schemas and fake implementations (ops/_library.py defines the ops),
  3. the autograd glue,
  4. the backend declarations used for dispatch, errors and `python -m fastvit_kernels.info`.

The math and the backend contract are in `fastvit_kernels/reference/bias_attention.py`.
"""

import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastvit_kernels.backends import Backend, standard_backends
from fastvit_kernels.ops._library import DispatcherOps
from fastvit_kernels.reference import bias_attention as reference

OP_NAME = "bias_attention"
ACTIVATIONS = (None, "hardswish", "silu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the reference backend only: it is there for gradcheck and oracles.
DTYPES_WITH_REFERENCE = DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# 1. Public function
# ---------------------------------------------------------------------------------------------


def bias_attention(q: Tensor, k: Tensor, v: Tensor, bias_table: Optional[Tensor] = None,
                   bias_index: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, activation: Optional[str] = None) -> Tensor:
    """softmax(q kᵀ · scale + bias_table[:, bias_index] + mask[b % W]) v, then an optional
    Hardswish or SiLU.

    Args:
        q: [B, H, Nq, Dk]; k: [B, H, Nk, Dk]; v: [B, H, Nk, Dv]. Any strides (per-head views
            of a fused qkv projection are read in place). float32, bfloat16 or float16.
        bias_table: [H, T] learnable relative-position biases (the inputs' dtype or float32),
            any strides: a table stored [T, H] (Swin) is passed as `table.t()`, no copy.
        bias_index: [Nq, Nk] integer tensor with values in [0, T). Both None: no bias.
        mask: [W, Nq, Nk] additive mask, constant (no gradient), in the inputs' dtype or
            float32; image b of the batch adds mask[b % W] (Swin's shifted windows: B is the
            number of images times W, windows of one image consecutive). B must be a multiple
            of W.
        scale: multiplies q·k; defaults to Dk ** -0.5.
        activation: None, "hardswish" or "silu" (LeViT applies one to the attention output;
            fused, forward and backward).

    Returns:
        [B, H, Nq, Dv] in q's dtype, whose memory is laid out [B, Nq, H, Dv], so
        `out.transpose(1, 2).reshape(B, Nq, H * Dv)` needs no copy.
    """
    _check_inputs(q, k, v, bias_table, bias_index, mask, scale, activation)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.onnx.is_in_onnx_export():
        # ONNX exporters trace the reference math into standard ONNX operators (docs/patching.md, "ONNX").
        return reference.bias_attention(q, k, v, bias_table, bias_index, scale, activation, mask)
    # The pre-activation output is kept only when a backward can follow.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias_table)
    )
    save_pre_activation = activation is not None and needs_grad
    backend = select_backend(q, k, v, bias_table, bias_index, mask)
    out, _, _ = OPS.forward(
        backend.name, q, k, v, bias_table, bias_index, mask, float(scale), activation or "none",
        save_pre_activation,
    )
    return out


def _fail(argument: str, expected: str, given) -> None:
    raise ValueError(f"bias_attention: {argument} must be {expected}, got {given}")


def _check_inputs(q, k, v, table, index, mask, scale, activation) -> None:
    """Checks that need only metadata, so they also run while torch.compile traces."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
    for name, t, layout in (("q", q, "[B, H, Nq, Dk]"), ("k", k, "[B, H, Nk, Dk]"), ("v", v, "[B, H, Nk, Dv]")):
        if t.dim() != 4:
            _fail(name, f"4-D {layout}", f"{t.dim()}-D tensor of shape {tuple(t.shape)}")
    if q.dtype not in DTYPES_WITH_REFERENCE:
        _fail("q", "of dtype float32, bfloat16 or float16", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(f"{name}.dtype", f"q's dtype {q.dtype}", t.dtype)
        if t.device != q.device:
            _fail(f"{name}.device", f"q's device {q.device}", t.device)
    B, H, Nq, Dk = q.shape
    if tuple(k.shape[:2]) != (B, H):
        _fail("k.shape[:2] (B, H)", f"{(B, H)} as in q", tuple(k.shape[:2]))
    if tuple(v.shape[:2]) != (B, H):
        _fail("v.shape[:2] (B, H)", f"{(B, H)} as in q", tuple(v.shape[:2]))
    if k.shape[3] != Dk:
        _fail("k.shape[3] (Dk)", f"{Dk} as in q", k.shape[3])
    Nk, Dv = k.shape[2], v.shape[3]
    if v.shape[2] != Nk:
        _fail("v.shape[2] (Nk)", f"{Nk} as in k", v.shape[2])
    if Nk < 1:
        _fail("k.shape[2] (Nk)", "at least 1 (softmax over no keys is undefined)", Nk)
    if Dk < 1 or Dv < 1:
        _fail("the head widths Dk, Dv", "at least 1", (Dk, Dv))
    if (table is None) != (index is None):
        _fail("bias_table and bias_index", "both given or both None",
              f"bias_table={'None' if table is None else 'a tensor'}, "
              f"bias_index={'None' if index is None else 'a tensor'}")
    if table is not None:
        if not isinstance(table, Tensor) or table.dim() != 2:
            _fail("bias_table", "a 2-D tensor [H, T]", _describe(table))
        if table.shape[0] != H or table.shape[1] < 1:
            _fail("bias_table.shape", f"[H={H}, T>=1]", list(table.shape))
        if table.dtype not in (q.dtype, torch.float32):
            _fail("bias_table.dtype", f"q's dtype {q.dtype} or torch.float32", table.dtype)
        if table.device != q.device:
            _fail("bias_table.device", f"q's device {q.device}", table.device)
        if not isinstance(index, Tensor) or index.dim() != 2:
            _fail("bias_index", "a 2-D tensor [Nq, Nk]", _describe(index))
        if tuple(index.shape) != (Nq, Nk):
            _fail("bias_index.shape", f"[Nq={Nq}, Nk={Nk}]", list(index.shape))
        if index.dtype not in INDEX_DTYPES:
            _fail("bias_index.dtype", "torch.int64 or torch.int32", index.dtype)
        if index.device != q.device:
            _fail("bias_index.device", f"q's device {q.device}", index.device)
    if mask is not None:
        _check_mask(mask, q, Nq, Nk)
    if activation not in ACTIVATIONS:
        _fail("activation", f"one of {ACTIVATIONS}", repr(activation))
    if scale is not None and not (isinstance(scale, (int, float)) and abs(float(scale)) < float("inf")):
        _fail("scale", "None or a finite float", repr(scale))


def _check_mask(mask, q, Nq, Nk) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 3:
        _fail("mask", "a 3-D tensor [W, Nq, Nk]", _describe(mask))
    W = mask.shape[0]
    if tuple(mask.shape[1:]) != (Nq, Nk) or W < 1:
        _fail("mask.shape", f"[W>=1, Nq={Nq}, Nk={Nk}]", list(mask.shape))
    if q.shape[0] % W != 0:
        _fail("q.shape[0] (B)", f"a multiple of the mask's window count W={W}", q.shape[0])
    if mask.dtype not in (q.dtype, torch.float32):
        _fail("mask.dtype", f"q's dtype {q.dtype} or torch.float32", mask.dtype)
    if mask.device != q.device:
        _fail("mask.device", f"q's device {q.device}", mask.device)
    if mask.requires_grad and torch.is_grad_enabled():
        _fail("mask", "a constant (requires_grad=False: the op gives the mask no gradient)",
              "a tensor that requires grad")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# Index buffers are constant in real models: their range is checked once per buffer version (on
# CUDA a check costs a host synchronisation). Keyed by id, with a weak reference so a recycled id
# is noticed; inference tensors have no version counter and are checked every time. (The C++
# kernels keep the same cache for the gathered bias, csrc/ops/bias_attention.cpp.)
_checked_indices: Dict[int, Tuple[weakref.ref, int, int]] = {}


def _check_index_values(index: Optional[Tensor], num_columns: int) -> None:
    if index is None or index.numel() == 0:
        return
    versioned = not index.is_inference()
    cached = _checked_indices.get(id(index))
    if versioned and cached is not None and cached[0]() is index and cached[1:] == (index._version, num_columns):
        return
    low, high = (int(x) for x in torch.aminmax(index))
    if low < 0 or high >= num_columns:
        raise IndexError(
            f"bias_attention: bias_index values must be in [0, T={num_columns}) (T = "
            f"bias_table.shape[1]), got values from {low} to {high}"
        )
    if versioned:
        if len(_checked_indices) > 256:
            _checked_indices.clear()
        _checked_indices[id(index)] = (weakref.ref(index), index._version, num_columns)


# ---------------------------------------------------------------------------------------------
# 2. Dispatcher ops
# ---------------------------------------------------------------------------------------------

# -> (out, pre-activation out or a 0-element tensor, lse [B, H, Nq] float32)
FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? index, Tensor? mask, float scale, "
    "str activation, bool save_pre_activation) -> (Tensor, Tensor, Tensor)"
)
# -> (dq, dk, dv, dtable or a 0-element tensor)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? index, Tensor? mask, "
    "Tensor o_pre, Tensor lse, float scale, str activation) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake_forward(q, k, v, table, index, mask, scale, activation, save_pre_activation):
    B, H, Nq, _ = q.shape
    Dv = v.shape[3]
    out = reference.empty_bhnd(B, H, Nq, Dv, q)
    if activation != "none" and save_pre_activation:
        o_pre = reference.empty_bhnd(B, H, Nq, Dv, q)
    else:
        o_pre = q.new_empty(0)
    lse = q.new_empty(B, H, Nq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, o_pre, lse


def _fake_backward(grad_out, q, k, v, table, index, mask, o_pre, lse, scale, activation):
    B, H, Nq, Dk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    dq = reference.empty_bhnd(B, H, Nq, Dk, q)
    dk = reference.empty_bhnd(B, H, Nk, Dk, q)
    dv = reference.empty_bhnd(B, H, Nk, Dv, q)
    dtable = torch.empty_like(table, memory_format=torch.contiguous_format) if table is not None else q.new_empty(0)
    return dq, dk, dv, dtable


def _value_checks(q, k, v, table, index, mask, scale, activation, save_pre_activation):
    """What the Python backends check of the values before running (the C++ kernels check the
    same, with the same message)."""
    if table is not None:
        _check_index_values(index, table.shape[1])


# ---------------------------------------------------------------------------------------------
# 3. Autograd
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    q, k, v, table, index, mask, scale, activation, _ = inputs
    out, o_pre, lse = output
    ctx.scale = scale
    ctx.activation = activation
    # With no activation, the output itself is the pre-activation output.
    ctx.save_for_backward(q, k, v, table, index, mask, out if activation == "none" else o_pre, lse)
    ctx.mark_non_differentiable(o_pre, lse)
    ctx.set_materialize_grads(False)  # _backward fills a missing output gradient itself


def _backward(ctx, grad_out, _grad_o_pre, _grad_lse):
    q, k, v, table, index, mask, o_pre, lse = ctx.saved_tensors
    if ctx.activation != "none" and o_pre.numel() == 0:
        raise RuntimeError(
            "bias_attention: backward needs the pre-activation output, which was not saved "
            "because no input required grad when the forward ran"
        )
    if grad_out is None:
        grad_out = torch.zeros_like(o_pre)
    dq, dk, dv, dtable = OPS.backward(
        ctx.backend, grad_out, q, k, v, table, index, mask, o_pre, lse, ctx.scale, ctx.activation
    )
    needs = ctx.needs_input_grad
    return (
        dq if needs[0] else None,
        dk if needs[1] else None,
        dv if needs[2] else None,
        dtable if table is not None and needs[3] else None,
        None,
        None,
        None,
        None,
        None,
    )


# ---------------------------------------------------------------------------------------------
# 4. Backends
# ---------------------------------------------------------------------------------------------


def _native_limits(q, k, v, table, index, mask=None) -> List[str]:
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(f"dtype {q.dtype} not in (float32, bfloat16, float16)")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        reasons.append(f"head width {max(q.shape[3], v.shape[3])} > {MAX_HEAD_DIM}")
    return reasons


# The Triton module's why_not covers its own dtype and size limits.
BACKENDS = standard_backends(OP_NAME, reference, DTYPES, _native_limits, triton_limits=lambda *inputs: [])
OPS = DispatcherOps(BACKENDS, FORWARD_SCHEMA, BACKWARD_SCHEMA, fake_forward=_fake_forward,
                    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
                    value_checks=_value_checks)


def select_backend(q, k, v, table=None, index=None, mask=None) -> Backend:
    return BACKENDS.select(q.device.type, q, k, v, table, index, mask)
