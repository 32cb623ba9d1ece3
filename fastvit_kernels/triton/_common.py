"""Pieces every Triton backend shares: the dot with its precision switch, block sizing, whether
the kernels run in Triton's interpreter, the device and dtype checks of `why_not`, and the
recording of the launches a launcher makes (each module's `compile_variants`, compiled ahead of
time for GPUs by `fastvit_kernels.triton.compile_check`)."""

import contextlib
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # IEEE: fp32 products with fp32 operands (the GPU's default would be TF32). Set for fp32
    # inputs (the casts are no-ops), and for bf16 under the interpreter, whose bf16 tl.dot is
    # wrong (bf16 x bf16 products are exact in fp32, so only the summation order differs).
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


def interpreted() -> bool:
    # TRITON_INTERPRET is read when @triton.jit runs (at this module's import, which precedes
    # every kernel module's), not per call.
    return type(dot).__name__ == "InterpretedFunction"


def pow2(n: int, cap: Optional[int] = None) -> int:
    """Power of two >= max(n, 16) (the GPU's minimum dot size), optionally capped (cap >= 16)."""
    p = max(16, triton.next_power_of_2(max(int(n), 1)))
    return min(p, cap) if cap else p


def fp32_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels' dots take fp32 operands (see dot)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def device_reasons(module: str, tensors: Sequence[Tuple[str, Tensor]], dtype: torch.dtype,
                   bf16_needs_sm80: bool = True) -> List[str]:
    """why_not's device part: one device, CUDA (or CPU under the interpreter), and bf16 dots
    only from compute capability 8.0 (kernels without dots pass bf16_needs_sm80=False)."""
    reasons = []
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on different devices {sorted(str(d) for d in devices)}")
    device = tensors[0][1].device
    if device.type == "cuda":
        if (bf16_needs_sm80 and not interpreted() and dtype == torch.bfloat16
                and torch.cuda.get_device_capability(device) < (8, 0)):
            reasons.append("bfloat16 dots need a GPU of compute capability >= 8.0")
    elif not interpreted():
        reasons.append(
            f"tensors on {device.type}: Triton runs on CUDA GPUs (or on CPU with TRITON_INTERPRET=1 "
            f"set before fastvit_kernels.triton.{module} is imported)"
        )
    return reasons


def dtype_reasons(dtype: torch.dtype, head_width: Optional[int] = None, max_head_dim: int = 0) -> List[str]:
    """why_not's kernel limits: a supported float dtype and, for attention, a head width (the
    widest of q's and v's last dimensions) up to max_head_dim. Shapes, ranks and matching dtypes
    are the op's own input checks (ops/<op>.py), which run before any backend is chosen."""
    reasons = []
    if dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {dtype} (supported: float32, bfloat16, float16)")
    if head_width is not None and head_width > max_head_dim:
        reasons.append(f"head width {head_width} > {max_head_dim}")
    return reasons


# ---------------------------------------------------------------------------------------------
# Launch recording (the variants compile_check compiles)
# ---------------------------------------------------------------------------------------------

# Triton's names of the pointer element types (triton.runtime.jit's type canonicalisation).
_POINTER_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}


class CompileVariant(NamedTuple):
    """One compilation of a kernel, as a launch specialises it.

    signature: Triton's type per parameter ("*bf16", "i32", "fp32", "u1" or "constexpr");
    constexprs: the values of the constexpr parameters, the declared ones and those Triton
    specialises at launch (integers equal to 1, None); divisible: the parameters launched with a
    value (integer or address) divisible by 16, which Triton compiles with tt.divisibility = 16;
    dtype: the inputs' dtype (that of the launch's first tensor argument); case: a label the
    recording code gave launches that differ only in their integer specialisation."""

    kernel: Any  # triton.runtime.jit.JITFunction
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    divisible: Tuple[str, ...]
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    case: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def config_key(self) -> tuple:
        """What makes a configuration: the kernel, its declared constexprs, num_warps, num_stages,
        the types of its pointer and float arguments, and the case (not the specialisation of
        integers, which follows the sizes)."""
        declared = {self.kernel.params[i].name for i in self.kernel.constexprs}
        return (self.kernel.fn.__module__, self.name, self.dtype, self.case, self.num_warps,
                self.num_stages,
                tuple((k, repr(v)) for k, v in self.constexprs.items() if k in declared),
                tuple((k, t) for k, t in self.signature.items() if t[0] in "*f"))


def _specialise(param, value) -> Tuple[str, Any]:
    """(type, spec) of one non-constexpr argument as Triton's launcher specialises it (the rules of
    triton.runtime.jit's specialize_impl): ("constexpr", value) for integers equal to 1 and None;
    else Triton's type and "D" for integers and tensor addresses divisible by 16, "" otherwise.
    (Meta tensors have addresses too: 0 plus the storage offset, so views keep their alignment.)"""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, int):
        if value == 1 and not param.do_not_specialize:
            return "constexpr", 1
        ty = "i32" if -2 ** 31 <= value < 2 ** 31 else ("u64" if value >= 2 ** 63 else "i64")
        return ty, "D" if value % 16 == 0 and not param.do_not_specialize else ""
    if isinstance(value, float):
        return "fp32", ""
    if isinstance(value, Tensor):
        aligned = value.data_ptr() % 16 == 0 and not param.do_not_specialize_on_alignment
        return "*" + _POINTER_TYPES[value.dtype], "D" if aligned else ""
    raise TypeError(f"{param.name}: cannot specialise a {type(value).__name__} argument")


_TRITON_SPECIALISE: List[Any] = []


def _triton_specialisation(param, value) -> Optional[Tuple[str, Any]]:
    """Triton's own (type, spec) of a launch argument, in _specialise's terms, when this Triton
    exposes it (triton.runtime.jit.native_specialize_impl); None otherwise."""
    if not _TRITON_SPECIALISE:
        try:
            from triton.backends.compiler import GPUTarget
            from triton.compiler.compiler import make_backend
            from triton.runtime.jit import native_specialize_impl

            backend = make_backend(GPUTarget("cuda", 90, 32))
            _TRITON_SPECIALISE.append(lambda p, v: native_specialize_impl(
                backend, v, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment))
        except Exception:  # noqa: BLE001 - an older or newer Triton: our rules alone
            _TRITON_SPECIALISE.append(None)
    specialise = _TRITON_SPECIALISE[0]
    if specialise is None:
        return None
    ty, spec = specialise(param, value)
    if ty == "constexpr":
        return ty, spec if spec is not None else value
    return ty, spec or ""


def launch_variant(kernel, args: Sequence, kwargs: Dict[str, Any], case: str = "") -> CompileVariant:
    """The CompileVariant that `kernel[grid](*args, **kwargs)` compiles."""
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", 3)  # Triton's defaults (CUDAOptions)
    names = [p.name for p in kernel.params]
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"{kernel.fn.__name__}: unknown launch options {sorted(unknown)}")
    bound = dict(zip(names, args), **kwargs)
    signature, constexprs, divisible = {}, {}, []
    tensor_dtype = None
    for p in kernel.params:
        value = bound[p.name]
        if isinstance(value, Tensor) and tensor_dtype is None:
            tensor_dtype = value.dtype
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = _specialise(p, value)
        check = _triton_specialisation(p, value)
        if check is not None and check != (ty, spec):
            raise RuntimeError(f"{kernel.fn.__name__}.{p.name}: specialised as {(ty, spec)}, "
                               f"Triton's launcher gives {check}: update _specialise")
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = spec
        elif spec == "D":
            divisible.append(p.name)
    return CompileVariant(kernel, signature, constexprs, tuple(divisible), int(num_warps),
                          int(num_stages), tensor_dtype, case)


class LaunchRecord(list):
    """The CompileVariants recorded_launches saw, one per configuration (CompileVariant.config_key)
    with the integer specialisation of the first launch that chose it. Set `case` to record
    launches of the configurations seen so far again, as other cases (e.g. another layout)."""

    case: str = ""


@contextlib.contextmanager
def recorded_launches() -> Iterator[LaunchRecord]:
    """Within the block, `kernel[grid](...)` records the CompileVariant it would compile (into
    the yielded LaunchRecord) instead of compiling and launching it. The launchers then run on
    "meta" tensors: no memory, no GPU, only their shape logic and block choice. Not under
    TRITON_INTERPRET (the kernels must be real JITFunctions) and not thread-safe."""
    if interpreted():
        raise RuntimeError("recorded_launches needs the compiled kernels: unset TRITON_INTERPRET "
                           "before fastvit_kernels.triton is imported")
    from triton.runtime.jit import JITFunction

    record = LaunchRecord()
    seen = set()

    def run(self, *args, grid, warmup, **kwargs):
        variant = launch_variant(self, args, kwargs, record.case)
        if variant.config_key() not in seen:
            seen.add(variant.config_key())
            record.append(variant)

    original = JITFunction.run
    JITFunction.run = run
    try:
        yield record
    finally:
        JITFunction.run = original


# Sequence lengths for compile_variants: one per power-of-two block of 16 to 128 rows (pow2 of
# each), none a multiple of 16, so that like LeViT's 49 and 196 tokens they specialise as plain
# integers.
SEQ_LENGTHS = (9, 25, 57, 121)


def head_widths(max_head_dim: int) -> List[int]:
    """The padded head widths pow2(D) of D up to max_head_dim: 16, 32, ..., max_head_dim."""
    return [w for w in (16 << i for i in range(16)) if w <= pow2(max_head_dim)]


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A contiguous tensor without memory, for recorded_launches."""
    return torch.empty(shape, dtype=dtype, device="meta")
