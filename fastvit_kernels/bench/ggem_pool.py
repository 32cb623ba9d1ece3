"""Microbenchmark of `fastvit_kernels.ops.ggem_pool` at ViT-S/B/L pooling shapes.

For each shape (the final tokens of ViT-S/16, ViT-B/16, ViT-L/16 at 224x224: N = 197 tokens of
which the cls token is skipped, C = 384 / 768 / 1024 channels, one group per head; see
docs/ggem_pool.md, "Shapes in real models") and each pass (forward; forward+backward), all
implementations are timed in the same run:

  op       fastvit_kernels.ops.ggem_pool(x, p, groups=heads, num_prefix_tokens=1), default backend
  eager    GGeM as it is usually written: p repeated per channel, x[:, 1:].clamp(min=eps),
           .pow(p), .mean over tokens, .pow(1 / p)
  compile  torch.compile of `eager`

Forward: no autograd. Forward+backward: torch.autograd.grad for x and p. Rows carry the time,
the speed-up of the op over each implementation (`op x` = impl ms / op ms), the error against a
float64 oracle and, with --bandwidth (default on), the fraction of the memory-bandwidth floor:
one read of x (and a write of y) forward; forward+backward adds one read of x and grad_y and one
write of dx. The bandwidth is that of a large device-to-device copy (on CPU: a copy of a buffer
larger than the last-level cache, by PyTorch's threads), measured in the same run.

    python -m fastvit_kernels.bench.ggem_pool --quick
    python -m fastvit_kernels.bench.ggem_pool --shapes vit_b --batch 256 --passes fwd fwd+bwd
"""

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from fastvit_kernels.bench import common
from fastvit_kernels.ops import ggem_pool
from fastvit_kernels.ops.ggem_pool import select_backend
from fastvit_kernels.reference import ggem_pool as reference

IMPLS = ("op", "eager", "compile")
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-6
P_INIT = 3.0

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


@dataclass(frozen=True)
class PoolShape:
    name: str
    model: str  # timm model whose final tokens these are (at 224x224)
    tokens: int  # N, prefix included
    prefix: int
    channels: int
    heads: int  # = GGeM groups

    def describe(self) -> str:
        return f"N={self.tokens} (prefix {self.prefix}) C={self.channels} groups={self.heads}"


SHAPES = (
    PoolShape("vit_s", "vit_small_patch16_224", 197, 1, 384, 6),
    PoolShape("vit_b", "vit_base_patch16_224", 197, 1, 768, 12),
    PoolShape("vit_l", "vit_large_patch16_224", 197, 1, 1024, 16),
)
QUICK_SHAPES = ("vit_b",)


def select_shapes(names: Optional[Sequence[str]]) -> List[PoolShape]:
    return common.select_by_name(SHAPES, names)


# ---------------------------------------------------------------------------------------------
# Implementations: f(x, p, shape) -> y [B, C]
# ---------------------------------------------------------------------------------------------


def impl_op(x, p, shape: PoolShape):
    return ggem_pool(x, p, groups=shape.heads, eps=EPS, num_prefix_tokens=shape.prefix)


def impl_eager(x, p, shape: PoolShape):
    pc = p.repeat_interleave(shape.channels // shape.heads)
    return x[:, shape.prefix:].clamp(min=EPS).pow(pc).mean(dim=1).pow(1.0 / pc)


def make_compiled_eager():
    return torch.compile(impl_eager, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Inputs (a case for common.bench_kernel_cases and the pytest-benchmark suite)
# ---------------------------------------------------------------------------------------------


class Case:
    def __init__(self, shape: PoolShape, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.batch, self.dtype, self.device = shape, batch, dtype, device
        self.name = shape.name
        g = torch.Generator(device="cpu").manual_seed(seed)
        # Final-norm outputs are roughly unit normal; about half fall below eps and are clamped.
        self.x = torch.randn(batch, shape.tokens, shape.channels, generator=g).to(device=device, dtype=dtype)
        self.p = torch.full((shape.heads,), P_INIT, device=device)  # float32, as GGeM keeps it
        self.grad_y = torch.randn(batch, shape.channels, generator=g).to(device=device, dtype=dtype)

    def describe(self) -> str:
        return f"B={self.batch} {self.shape.describe()} {common.dtype_name(self.dtype)}"

    def row_fields(self) -> Dict[str, object]:
        s = self.shape
        return dict(case=s.name, model=s.model, B=self.batch, N=s.tokens, prefix=s.prefix, C=s.channels,
                    groups=s.heads, dtype=common.dtype_name(self.dtype))

    def backend(self) -> str:
        return select_backend(self.x, self.p).name

    def floor_bytes(self, pass_: str) -> int:
        es = self.x.element_size()
        pooled = self.batch * (self.shape.tokens - self.shape.prefix) * self.shape.channels * es
        y = self.batch * self.shape.channels * es
        fwd = pooled + y
        if pass_ == "fwd":
            return fwd
        dx = self.x.numel() * es
        return fwd + pooled + y + dx  # read x and grad_y again, write dx

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        """The reference in float64 (or `dtype`, p staying float32 as GGeM keeps it): [y], or the
        gradients of x and p."""
        x = self.x.detach().to(dtype).requires_grad_(need_grads)
        p = self.p.detach().to(dtype if dtype == torch.float64 else torch.float32).requires_grad_(need_grads)
        with torch.set_grad_enabled(need_grads):
            y = reference.ggem_pool(x, p, self.shape.heads, EPS, "contiguous", self.shape.prefix)
            if not need_grads:
                return [y.detach()]
            return list(torch.autograd.grad(y, (x, p), self.grad_y.to(dtype)))

    def make_callable(self, impl: str, pass_: str):
        """One iteration of `impl` for the pass, returning what `oracle` returns."""
        f = make_compiled_eager() if impl == "compile" else {"op": impl_op, "eager": impl_eager}[impl]
        if pass_ == "fwd":

            def run():
                with torch.no_grad():
                    return [f(self.x, self.p, self.shape)]

            return run
        x_leaf = self.x.detach().requires_grad_()
        p_leaf = self.p.detach().requires_grad_()

        def run():
            y = f(x_leaf, p_leaf, self.shape)
            return list(torch.autograd.grad(y, (x_leaf, p_leaf), self.grad_y))

        return run


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(shapes: Sequence[PoolShape], *, batch: int, dtype: torch.dtype, device: torch.device, env: Dict,
        quick: bool = False, impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES,
        bandwidth: bool = True, backend: Optional[str] = None) -> List[Dict]:
    """Benchmarks every shape; returns rows with `ref_speedup` = this impl's time / the op's time.
    `backend` forces the op's backend (common.forcing_backend); default: its automatic choice."""
    measured = common.copy_bandwidth(device, env) if bandwidth else None
    cases = (Case(shape, batch, dtype, device) for shape in shapes)
    rows = common.bench_kernel_cases(cases, impls, passes, env, quick=quick, bandwidth=measured, backend=backend)
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(rows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--shapes", nargs="+", help=f"names or substrings (all: {' '.join(s.name for s in SHAPES)})")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    return run(select_shapes(args.shapes or (QUICK_SHAPES if args.quick else None)), batch=ctx.batch,
               dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick, impls=args.impls,
               passes=args.passes, bandwidth=not args.no_bandwidth)


def report(rows: List[Dict], ctx: common.Context) -> str:
    bandwidth = ctx.env.get("copy_bandwidth_gbs")
    return (f"copy bandwidth {bandwidth} GB/s\n" if bandwidth else "") + table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_ggem", batch=(256, 256), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       quick_help=f"shapes {' '.join(QUICK_SHAPES)}, short timings")


if __name__ == "__main__":
    sys.exit(main())
