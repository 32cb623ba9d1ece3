"""Microbenchmark of `fastvit_kernels.ops.qna_attention` at the QnA-ViT tiny shapes.

For each QnA layer shape of QnA-ViT tiny at 224x224 (56x56, 28x28 and 14x14 tokens, the three
strided layers, each with k = 3, k = 5 and k = 7: k = 7 is QnA-ViT tiny_7x7) and each pass
(forward; forward+backward), all implementations are timed in the same run:

  op              fastvit_kernels.ops.qna_attention, default backend
  unfold          the naive formulation: every window unfolded (pad + Tensor.unfold), masked
                  softmax, einsum with the unfolded values (fastvit_kernels.reference)
  conv            the JAX original's formulation written in PyTorch: two depthwise (grouped)
                  convolutions of exp(cost)*v and exp(cost) with kernels exp(rpe)*attn_scale and
                  exp(rpe), divided (no max subtraction, as in the original)
  compile-unfold  torch.compile of `unfold`
  compile-conv    torch.compile of `conv`

With `--level layer` (or `both`), the same comparison runs on the whole QnA layer
(`fastvit_kernels.QnA`: one projection matmul for values and scores, the attention, to_out) with
the attention step swapped for each implementation (`layer-op` is the module as shipped).

Inputs are what the QnA layer makes: v [B, Hi, Wi, h, d] and cost [B, Hi, Wi, Q, h] are slices
of one projection buffer [B, Hi, Wi, h*d + Q*h]; rpe and attn_scale [k*k, Q, h] float32. Every
implementation returns [B, Ho, Wo, h*d] (what to_out consumes). Forward+backward takes the
gradients of the projection buffer, rpe and attn_scale with torch.autograd.grad. Peak memory is
the most bytes allocated at once during a pass beyond its inputs (CPU: the allocator's running
total from the PyTorch profiler at the calling thread's allocations, the C++ kernels' scratch
included; what other threads allocate for the same op, about 1.5 MiB each for qna_attention's
kernels, is counted only while the calling thread's own scratch is live; CUDA:
max_memory_allocated).

    python -m fastvit_kernels.bench.qna_attention --quick
    python -m fastvit_kernels.bench.qna_attention --shapes s0 --kernel-sizes 3 --passes fwd
"""

import contextlib
import copy
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import qna_attention
from fastvit_kernels.ops.qna_attention import select_backend
from fastvit_kernels.reference import qna_attention as reference

IMPLS = ("op", "unfold", "conv", "compile-unfold", "compile-conv")
PASSES = ("fwd", "fwd+bwd")
KERNEL_SIZES = (3, 5, 7)
QUICK_SHAPES = ("s0.qna",)

# Each case compiles new graphs; never fall back to eager silently, never use dynamic shapes.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


@dataclass(frozen=True)
class QnaShape:
    """One QnA layer of QnA-ViT tiny at 224x224 (B and k are chosen by the benchmark)."""

    name: str  # e.g. "s0.qna" (stage 0, stride 1), "s0.down" (the strided layer ending stage 0)
    side: int  # input map height Hi (and width Wi unless `width` is given)
    heads: int
    head_dim: int
    stride: int
    queries: int = 2
    width: Optional[int] = None  # input map width Wi when not square (QnA-ViT's maps are square)

    @property
    def features(self) -> int:
        return self.heads * self.head_dim

    @property
    def size(self) -> Tuple[int, int]:
        """The input map (Hi, Wi)."""
        return self.side, self.width or self.side

    def output_size(self, k: int) -> Tuple[int, int]:
        """The output map (Ho, Wo) for kernel size k."""
        return tuple(reference.output_size(n, k, self.stride) for n in self.size)

    def describe(self, k: int) -> str:
        (hi, wi), (ho, wo) = self.size, self.output_size(k)
        return (f"{hi}x{wi}->{ho}x{wo} h={self.heads} d={self.head_dim} Q={self.queries} "
                f"k={k} s={self.stride}")


# docs/qna_attention.md, "Shapes in real models": C = 64/128/256 with 8/16/32 heads of d = 8;
# each strided layer doubles C and heads.
QNA_VIT_TINY_SHAPES = (
    QnaShape("s0.qna", 56, 8, 8, 1),
    QnaShape("s0.down", 56, 16, 8, 2),
    QnaShape("s1.qna", 28, 16, 8, 1),
    QnaShape("s1.down", 28, 32, 8, 2),
    QnaShape("s2.qna", 14, 32, 8, 1),
    QnaShape("s2.down", 14, 64, 8, 2),
)


def select_shapes(patterns: Optional[Sequence[str]]) -> List[QnaShape]:
    return common.select_by_name(QNA_VIT_TINY_SHAPES, patterns)


# ---------------------------------------------------------------------------------------------
# Inputs (cases for common.bench_kernel_cases; Case also for the pytest-benchmark suite)
# ---------------------------------------------------------------------------------------------


def _describe(case) -> str:
    return (f"{case.level} level, B={case.batch} {case.shape.describe(case.k)} "
            f"{common.dtype_name(case.dtype)}")


def _row_fields(case) -> Dict[str, object]:
    s = case.shape
    return dict(level=case.level, case=case.name, shape=s.name, k=case.k, stride=s.stride, B=case.batch,
                side=s.side, width=s.size[1], heads=s.heads, head_dim=s.head_dim, Q=s.queries, dtype=common.dtype_name(case.dtype))


class Case:
    """Op level, one (shape, k): the fused projection buffer, rpe, attn_scale, an output gradient."""

    level = "op"

    def __init__(self, shape: QnaShape, k: int, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.k, self.batch, self.dtype, self.device = shape, k, batch, dtype, device
        s = shape
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*size, dtype=dtype):
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        self.projection = randn(batch, *s.size, s.features + s.queries * s.heads)
        self.rpe = randn(k * k, s.queries, s.heads, dtype=torch.float32)
        self.attn_scale = randn(k * k, s.queries, s.heads, dtype=torch.float32)
        self.grad_out = randn(batch, *s.output_size(k), s.features)
        self.name = f"{s.name}.k{k}"

    def describe(self) -> str:
        return _describe(self)

    def row_fields(self) -> Dict[str, object]:
        return _row_fields(self)

    def views(self, projection: torch.Tensor):
        """(cost, v) as strided views of the projection buffer, as the QnA module makes them."""
        s = self.shape
        # split, as the module: its backward writes both gradients into one buffer (two slices
        # would each allocate and zero a projection-sized gradient, which the memory column counts).
        v, cost = projection.split([s.features, s.queries * s.heads], dim=-1)
        return cost.unflatten(-1, (s.queries, s.heads)), v.unflatten(-1, (s.heads, s.head_dim))

    def backend(self) -> str:
        cost, v = self.views(self.projection)
        return select_backend(cost, v, self.rpe, self.attn_scale, self.k, self.shape.stride).name

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64):
        """The reference output in float64 (or `dtype`: the projection's; rpe and attn_scale stay
        float32 then, as the layer keeps them), or the gradients of projection, rpe and attn_scale."""
        param_dtype = dtype if dtype == torch.float64 else torch.float32
        leaves = [self.projection.detach().to(dtype)] + [t.detach().to(param_dtype) for t in (self.rpe, self.attn_scale)]
        leaves = [t.requires_grad_(need_grads) for t in leaves]
        with torch.set_grad_enabled(need_grads):
            cost, v = self.views(leaves[0])
            out = impl_unfold(cost, v, leaves[1], leaves[2], self.k, self.shape.stride)
            if not need_grads:
                return [out]
            return list(torch.autograd.grad(out, leaves, self.grad_out.to(dtype)))

    def make_callable(self, impl: str, pass_: str) -> Callable[[], List[torch.Tensor]]:
        """One iteration of `impl`, returning what `oracle` returns."""
        f = make_impl(impl)
        k, stride = self.k, self.shape.stride
        if pass_ == "fwd":

            def run():
                with torch.no_grad():
                    cost, v = self.views(self.projection)
                    return [f(cost, v, self.rpe, self.attn_scale, k, stride)]

            return run
        leaves = [t.detach().clone().requires_grad_() for t in (self.projection, self.rpe, self.attn_scale)]

        def run():
            cost, v = self.views(leaves[0])
            out = f(cost, v, leaves[1], leaves[2], k, stride)
            return list(torch.autograd.grad(out, leaves, self.grad_out))

        return run


class LayerCase:
    """Layer level, one (shape, k): a fastvit_kernels.QnA layer and its input image."""

    level = "layer"

    def __init__(self, shape: QnaShape, k: int, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        from fastvit_kernels.modules import QnA

        self.shape, self.k, self.batch, self.dtype, self.device = shape, k, batch, dtype, device
        s = shape
        torch.manual_seed(seed)
        in_dim = s.features // s.stride  # the strided layers double the channels
        self.module = QnA(in_dim, s.features, s.heads, num_queries=s.queries, kernel_size=k, stride=s.stride)
        with torch.no_grad():  # trained-looking parameters (rpe is zero at init)
            self.module.rpe.normal_(std=1.0)
            self.module.attn_scale.normal_(std=1.0)
        self.module.to(device=device, dtype=dtype)
        self.x = torch.randn(batch, *s.size, in_dim, device=device, dtype=dtype)
        self.grad_out = torch.randn(batch, *s.output_size(k), s.features, device=device, dtype=dtype)
        self.name = f"{s.name}.k{k}"

    def describe(self) -> str:
        return _describe(self)

    def row_fields(self) -> Dict[str, object]:
        return _row_fields(self)

    def backend(self) -> str:
        m, s = self.module, self.shape
        cost = self.x.new_empty(1, *s.size, s.queries, s.heads)
        v = self.x.new_empty(1, *s.size, s.heads, s.head_dim)
        return select_backend(cost, v, m.rpe, m.attn_scale, self.k, s.stride).name

    def _run(self, module, x, need_grads: bool, grad_out):
        if not need_grads:
            with torch.no_grad():
                return [module(x)]
        leaves = [x] + list(module.parameters())
        return list(torch.autograd.grad(module(x), leaves, grad_out))

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64):
        module = copy.deepcopy(self.module).to(dtype)
        x = self.x.detach().to(dtype).requires_grad_(need_grads)
        with qna_attention_swapped("unfold"):
            return self._run(module, x, need_grads, self.grad_out.to(dtype))

    def make_callable(self, impl: str, pass_: str) -> Callable[[], List[torch.Tensor]]:
        need_grads = pass_ != "fwd"
        module = self.module
        compiled = impl.startswith("compile-")
        formulation = impl[len("compile-"):] if compiled else impl
        if compiled:
            module = torch.compile(copy.deepcopy(self.module), dynamic=False)
        x = self.x.detach().clone().requires_grad_(need_grads)

        def run():
            with qna_attention_swapped(formulation):
                return self._run(module, x, need_grads, self.grad_out)

        return run


# ---------------------------------------------------------------------------------------------
# Implementations: f(cost, v, rpe, attn_scale, k, stride) -> [B, Ho, Wo, h*d]
# ---------------------------------------------------------------------------------------------


def impl_op(cost, v, rpe, attn_scale, k, stride):
    return qna_attention(cost, v, rpe, attn_scale, kernel_size=k, stride=stride).flatten(-2)


def impl_unfold(cost, v, rpe, attn_scale, k, stride):
    return reference.qna_attention(cost, v, rpe, attn_scale, k, stride).flatten(-2)


def impl_conv(cost, v, rpe, attn_scale, k, stride):
    """The JAX code's two grouped convolutions. Zero padding of exp(cost) is the mask."""
    B, Hi, Wi, Q, H = cost.shape
    d = v.shape[-1]
    pad = (k - 1) // 2
    exp_cost = cost.exp()
    weighted_v = (exp_cost.unsqueeze(-1) * v.unsqueeze(3)).flatten(3)  # [B, Hi, Wi, Q*h*d]
    rpe_exp = rpe.exp().to(cost.dtype).permute(1, 2, 0).reshape(Q * H, 1, k, k)
    scale = attn_scale.to(cost.dtype).permute(1, 2, 0).reshape(Q * H, 1, k, k)
    # NHWC buffers seen as NCHW (channels-last memory: the layout depthwise convs like).
    numerator = F.conv2d(weighted_v.permute(0, 3, 1, 2), (rpe_exp * scale).repeat_interleave(d, 0),
                         stride=stride, padding=pad, groups=Q * H * d)
    denominator = F.conv2d(exp_cost.flatten(3).permute(0, 3, 1, 2), rpe_exp,
                           stride=stride, padding=pad, groups=Q * H)
    Ho, Wo = numerator.shape[2:]
    out = numerator.view(B, Q, H, d, Ho, Wo) / denominator.view(B, Q, H, 1, Ho, Wo)
    return out.sum(dim=1).permute(0, 3, 4, 1, 2).flatten(3)


IMPL_FNS: Dict[str, Callable] = {"op": impl_op, "unfold": impl_unfold, "conv": impl_conv}


def make_impl(impl: str) -> Callable:
    if impl.startswith("compile-"):
        return torch.compile(IMPL_FNS[impl[len("compile-"):]], dynamic=False)
    return IMPL_FNS[impl]


def _as_module_attention(formulation: Callable) -> Callable:
    """formulation(cost, v, rpe, attn_scale, k, stride) -> [B, Ho, Wo, h*d] under the op's
    signature, returning [B, Ho, Wo, h, d] as the op does."""

    def attention(cost, v, rpe, attn_scale, *, kernel_size, stride=1):
        return formulation(cost, v, rpe, attn_scale, kernel_size, stride).unflatten(-1, v.shape[-2:])

    return attention


# Built once: torch.compile guards on the identity of the functions a module calls.
_MODULE_ATTENTION = {name: _as_module_attention(fn) for name, fn in IMPL_FNS.items() if name != "op"}


@contextlib.contextmanager
def qna_attention_swapped(impl: str):
    """Runs fastvit_kernels.QnA with the attention step of `impl` (plain PyTorch for the peers,
    so torch.compile sees and fuses it) for the duration of the block; 'op' changes nothing."""
    from fastvit_kernels.modules import qna as qna_module

    original = qna_module.qna_attention
    if impl != "op":
        qna_module.qna_attention = _MODULE_ATTENTION[impl]
    try:
        yield
    finally:
        qna_module.qna_attention = original


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


GROUP = ("level", "case", "pass")


def add_memory_ratios(rows: List[Dict], ref_impl: str = "op") -> None:
    """row['mem_vs_op'] = this row's peak memory / the op's, per (level, case, pass)."""
    ref = {tuple(r[key] for key in GROUP): r.get("peak_mb") for r in rows if r["impl"] == ref_impl}
    for row in rows:
        op_mb = ref.get(tuple(row[key] for key in GROUP))
        row["mem_vs_op"] = row["peak_mb"] / op_mb if op_mb and row.get("peak_mb") else None


LEVELS = {"op": Case, "layer": LayerCase}


def run(shapes: Sequence[QnaShape], *, kernel_sizes: Sequence[int], batch: int, dtype: torch.dtype,
        device: torch.device, env: Dict, quick: bool = False, impls: Sequence[str] = IMPLS,
        passes: Sequence[str] = PASSES, levels: Sequence[str] = ("op",), backend: Optional[str] = None) -> List[Dict]:
    """Benchmarks every (level, shape, k); rows get `ref_speedup` = this impl's time / the op's.
    `backend` forces the op's backend (common.forcing_backend); default: its automatic choice."""
    cases = (LEVELS[level](shape, k, batch, dtype, device)
             for level in levels for k in kernel_sizes for shape in shapes)
    rows = common.bench_kernel_cases(cases, impls, passes, env, quick=quick, peak_memory=True, backend=backend)
    common.add_ratios(rows, "op", group_keys=GROUP)
    add_memory_ratios(rows)
    return rows


def summarize(rows: List[Dict]) -> List[Dict]:
    """Per (level, case, pass): the op against the fastest eager formulation and the fastest
    compiled one, and its peak memory against unfold (the numbers the targets are stated in)."""
    summary = []
    keys = sorted({tuple(r[key] for key in GROUP) for r in rows}, key=lambda c: (c[0] != "op", c[2], c[1]))
    for key in keys:
        group = {r["impl"]: r for r in rows if tuple(r[k] for k in GROUP) == key}
        op = group.get("op")
        if not op or not op.get("ms"):
            continue

        def fastest(names):
            timed = [group[n] for n in names if n in group and group[n].get("ms")]
            return min(timed, key=lambda r: r["ms"]) if timed else None

        eager = fastest(("unfold", "conv"))
        compiled = fastest(("compile-unfold", "compile-conv"))
        unfold = group.get("unfold")
        summary.append({
            "level": key[0], "case": key[1], "pass": key[2], "op_ms": op["ms"],
            "fastest_eager": eager["impl"] if eager else None,
            "vs_eager": eager["ms"] / op["ms"] if eager else None,
            "fastest_compiled": compiled["impl"] if compiled else None,
            "vs_compiled": compiled["ms"] / op["ms"] if compiled else None,
            "mem_vs_unfold": op["peak_mb"] / unfold["peak_mb"] if unfold and unfold.get("peak_mb") else None,
        })
    return summary


COLUMNS = [
    common.Column("level", "level", left=True),
    common.Column("case", "case", left=True),
    common.Column("pass", "pass", left=True),
    common.Column("impl", "impl", left=True),
    common.Column("ms", "ms", "{:.3f}"),
    common.Column("ref_speedup", "op x", "{:.2f}"),
    common.Column("peak_mb", "peak MiB", "{:.0f}"),
    common.Column("mem_vs_op", "mem/op", "{:.2f}"),
    common.Column("max_rel_err", "rel err", "{:.1e}"),
    common.Column("first_call_s", "1st s", "{:.1f}"),
    common.Column("note", "note", left=True),
]

SUMMARY_COLUMNS = [
    common.Column("level", "level", left=True),
    common.Column("case", "case", left=True),
    common.Column("pass", "pass", left=True),
    common.Column("op_ms", "op ms", "{:.3f}"),
    common.Column("fastest_eager", "fastest eager", left=True),
    common.Column("vs_eager", "op x", "{:.2f}"),
    common.Column("fastest_compiled", "fastest compiled", left=True),
    common.Column("vs_compiled", "op x", "{:.2f}"),
    common.Column("mem_vs_unfold", "op mem / unfold", "{:.2f}"),
]


def table(rows: List[Dict]) -> str:
    return common.noted_table(rows, COLUMNS, common.backend_note)


def summary_table(rows: List[Dict]) -> str:
    return common.format_table(summarize(rows), SUMMARY_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--shapes", nargs="+", help="names or substrings, e.g. s0 down "
                        f"(all: {' '.join(s.name for s in QNA_VIT_TINY_SHAPES)})")
    parser.add_argument("--kernel-sizes", nargs="+", type=int, default=list(KERNEL_SIZES))
    parser.add_argument("--level", choices=("op", "layer", "both"), default="both",
                        help="the op alone, the whole QnA layer (projection, attention, to_out), or both")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    shapes = select_shapes(args.shapes or (QUICK_SHAPES if args.quick else None))
    kernel_sizes = [3] if args.quick and args.kernel_sizes == list(KERNEL_SIZES) else args.kernel_sizes
    rows = run(shapes, kernel_sizes=kernel_sizes, batch=ctx.batch, dtype=ctx.dtype, device=ctx.device,
               env=ctx.env, quick=ctx.quick, impls=args.impls, passes=args.passes,
               levels=("op", "layer") if args.level == "both" else (args.level,))
    ctx.json_extra["summary"] = summarize(rows)
    return rows


def report(rows: List[Dict], ctx: common.Context) -> str:
    return table(rows) + "\n\n" + summary_table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_qna", batch=(32, 128), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       quick_help=f"shapes {' '.join(QUICK_SHAPES)}, k=3, short timings")


if __name__ == "__main__":
    sys.exit(main())
