"""Microbenchmark of `fastvit_kernels.ops.ggem_pool` at ViT-S/B/L pooling shapes.

Lives in the package so that it runs from an installed package too; `benchmarks/bench_ggem.py`
is its command line.

For each shape (the final tokens of ViT-S/16, ViT-B/16, ViT-L/16 at 224x224: N = 197 tokens of
which the cls token is skipped, C = 384 / 768 / 1024 channels, one group per head) and each pass
(forward; forward+backward), all implementations are timed in the same run:

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

    python benchmarks/bench_ggem.py --quick
    python benchmarks/bench_ggem.py --shapes vit_b --batch 256 --passes fwd fwd+bwd
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastvit_kernels.bench import common
from fastvit_kernels.ops import ggem_pool
from fastvit_kernels.ops.ggem_pool import select_backend
from fastvit_kernels.reference import ggem_pool as reference

IMPLS = ("op", "eager", "compile")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
    if not names:
        return list(SHAPES)
    chosen = [s for s in SHAPES if any(n in s.name for n in names)]
    if not chosen:
        raise SystemExit(f"no shape matches {list(names)}; shapes are: {', '.join(s.name for s in SHAPES)}")
    return chosen


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
# Inputs, oracle, floor
# ---------------------------------------------------------------------------------------------


class Case:
    def __init__(self, shape: PoolShape, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.batch, self.dtype, self.device = shape, batch, dtype, device
        g = torch.Generator(device="cpu").manual_seed(seed)
        # Final-norm outputs are roughly unit normal; about half fall below eps and are clamped.
        self.x = torch.randn(batch, shape.tokens, shape.channels, generator=g).to(device=device, dtype=dtype)
        self.p = torch.full((shape.heads,), P_INIT, device=device)  # float32, as GGeM keeps it
        self.grad_y = torch.randn(batch, shape.channels, generator=g).to(device=device, dtype=dtype)

    def floor_bytes(self, pass_: str) -> int:
        es = self.x.element_size()
        pooled = self.batch * (self.shape.tokens - self.shape.prefix) * self.shape.channels * es
        y = self.batch * self.shape.channels * es
        fwd = pooled + y
        if pass_ == "fwd":
            return fwd
        dx = self.x.numel() * es
        return fwd + pooled + y + dx  # read x and grad_y again, write dx

    def oracle(self, need_grads: bool):
        x = self.x.detach().double().requires_grad_(need_grads)
        p = self.p.detach().double().requires_grad_(need_grads)
        with torch.set_grad_enabled(need_grads):
            y = reference.ggem_pool(x, p, self.shape.heads, EPS, "contiguous", self.shape.prefix)
            if not need_grads:
                return [y.detach()]
            return list(torch.autograd.grad(y, (x, p), self.grad_y.double()))


def measure_cpu_copy_bandwidth(nbytes: int = 512 << 20) -> float:
    """CPU memory bandwidth in bytes/s: a copy between two buffers larger than the last-level
    cache, by PyTorch's intra-op threads (counts the read and the write)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    ms = common.benchmark_ms(lambda: dst.copy_(src), torch.device("cpu"))["ms"]
    return 2 * nbytes / (ms / 1e3)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _make_callable(impl: str, case: Case, pass_: str) -> Callable[[], object]:
    if impl == "compile":
        f = make_compiled_eager()
    else:
        f = {"op": impl_op, "eager": impl_eager}[impl]
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                return [f(case.x, case.p, case.shape)]

        return run
    x_leaf = case.x.detach().requires_grad_()
    p_leaf = case.p.detach().requires_grad_()

    def run():
        y = f(x_leaf, p_leaf, case.shape)
        return list(torch.autograd.grad(y, (x_leaf, p_leaf), case.grad_y))

    return run


def bench_case(case: Case, impls: Sequence[str], passes: Sequence[str], env: Dict, quick: bool,
               bandwidth: Optional[float]) -> List[Dict]:
    s = case.shape
    rows = []
    for pass_ in passes:
        want = case.oracle(need_grads=pass_ != "fwd")
        for impl in impls:
            row = common.make_row(
                env, case=s.name, model=s.model, B=case.batch, N=s.tokens, prefix=s.prefix, C=s.channels,
                groups=s.heads, dtype=str(case.dtype).replace("torch.", ""), **{"pass": pass_}, impl=impl,
            )
            common.log(f"{s.name} {pass_:7s} {impl:8s} ...")

            def prepare(impl=impl, row=row, pass_=pass_):
                if impl == "op":
                    row["backend"] = select_backend(case.x, case.p).name
                return _make_callable(impl, case, pass_), list

            rows.append(common.measure(row, prepare, want, case.device, quick=quick,
                                       floor_bytes=case.floor_bytes(pass_), bandwidth=bandwidth))
    return rows


def run(shapes: Sequence[PoolShape], *, batch: int, dtype: torch.dtype, device: torch.device, env: Dict,
        quick: bool = False, impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES,
        bandwidth: bool = True) -> List[Dict]:
    """Benchmarks every shape; returns rows with `ref_speedup` = this impl's time / the op's time."""
    measured = None
    if bandwidth:
        common.log(f"measuring {device.type} copy bandwidth ...")
        measured = common.measure_copy_bandwidth(device) if device.type == "cuda" else measure_cpu_copy_bandwidth()
        env["copy_bandwidth_gbs"] = round(measured / 1e9, 1)
        common.log(f"    {measured / 1e9:.1f} GB/s")
    rows = []
    for shape in shapes:
        common.log(f"case {shape.name}: B={batch} {shape.describe()} {str(dtype).replace('torch.', '')}")
        case = Case(shape, batch, dtype, device)
        rows += bench_case(case, impls, passes, env, quick, measured)
        del case
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--shapes", nargs="+", help=f"names or substrings (all: {' '.join(s.name for s in SHAPES)})")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--quick", action="store_true", help=f"shapes {' '.join(QUICK_SHAPES)}, short timings")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json)")
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    shapes = select_shapes(args.shapes or (QUICK_SHAPES if args.quick else None))
    env = common.environment(device)
    print(common.describe_env(env), file=sys.stderr)
    rows = run(shapes, batch=args.batch, dtype=dtype, device=device, env=env, quick=args.quick,
               impls=args.impls, passes=args.passes, bandwidth=not args.no_bandwidth)
    print(common.describe_env(env))
    if env.get("copy_bandwidth_gbs"):
        print(f"copy bandwidth {env['copy_bandwidth_gbs']} GB/s")
    print(table(rows))
    path = common.write_json(args.out or common.default_out_path("bench_ggem", env), env, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
