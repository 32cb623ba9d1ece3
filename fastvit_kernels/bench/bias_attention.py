"""Microbenchmark of `fastvit_kernels.ops.bias_attention` at every LeViT attention shape.

Lives in the package so that `python -m fastvit_kernels.bench` runs it from an installed package
too; `benchmarks/bench_bias_attention.py` is its command line.

For each shape (block attention and shrink attention of levit_128s and levit_256 at 224x224) and
each pass (forward; forward+backward), all implementations are timed in the same run:

  op       fastvit_kernels.ops.bias_attention(..., activation="hardswish"), default backend
  eager    the math as timm writes it: q @ k^T * scale + table[:, idx], softmax, @ v, Hardswish
  sdpa     F.scaled_dot_product_attention with the bias materialised as attn_mask, then Hardswish
  compile  torch.compile of `eager`
  flex     torch.compile'd FlexAttention with score_mod = score + table[h, idx[q, kv]], Hardswish

Every implementation produces what LeViT's proj consumes, [B, Nq, H*Dv] after Hardswish, so the
(B, H, N, D) -> (B, N, H*D) copy that eager attention needs is timed (the op's output layout
makes it a free view). Inputs are strided per-head views of one fused qkv buffer [B, N, H, 2Dk+Dv]
(shrink: kv [B, Nk, H, Dk+Dv] and q [B, Nq, H*Dk]), as in timm.

Forward: no autograd; eager/sdpa/compile read a pre-gathered bias [H, Nq, Nk] as timm's eval
cache does. Forward+backward: the gather is inside the timed region (the table gets a gradient),
gradients are taken for the fused buffer(s) and the table with torch.autograd.grad.

    python benchmarks/bench_bias_attention.py --quick
    python benchmarks/bench_bias_attention.py --shapes 128s.attn14 256.attn14 --passes fwd
"""

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.ops.bias_attention import select_backend
from fastvit_kernels.reference import bias_attention as reference

IMPLS = ("op", "eager", "sdpa", "compile", "flex")
PASSES = ("fwd", "fwd+bwd")
QUICK_SHAPES = ("128s.attn14", "128s.shrink14-7")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Each case compiles new graphs for `compile` and `flex` (20 shapes x passes in a full run): raise
# dynamo's recompile limit so none silently falls back to eager, and never use dynamic shapes.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


class Case:
    """Inputs for one shape: fused projection buffers, bias table and index, an output gradient."""

    def __init__(self, shape: common.AttentionShape, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.batch, self.dtype, self.device = shape, batch, dtype, device
        s = shape
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*size):
            return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

        if s.kind == "block":
            self.buffers = [randn(batch, s.nk, s.heads, 2 * s.key_dim + s.val_dim)]  # fused qkv
        else:
            self.buffers = [
                randn(batch, s.nq, s.heads * s.key_dim),  # q projection of the subsampled grid
                randn(batch, s.nk, s.heads, s.key_dim + s.val_dim),  # fused kv
            ]
        self.table = randn(s.heads, s.table_size)  # std 1: trained LeViT biases are large
        self.index = common.levit_bias_index(s.resolution, s.stride, device=device)
        self.grad_out = randn(batch, s.nq, s.heads * s.val_dim)
        self.scale = s.key_dim**-0.5

    def views(self, buffers: Sequence[torch.Tensor]):
        """q, k, v as [B, H, N, D] strided views of the buffers (no copies), as timm makes them."""
        s = self.shape
        if s.kind == "block":
            q, k, v = buffers[0].split([s.key_dim, s.key_dim, s.val_dim], dim=3)
        else:
            q = buffers[0].view(self.batch, s.nq, s.heads, s.key_dim)
            k, v = buffers[1].split([s.key_dim, s.val_dim], dim=3)
        return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)

    def grad_leaves(self):
        """Copies of the buffers and the table that require grad (for forward+backward)."""
        return [b.detach().clone().requires_grad_() for b in self.buffers + [self.table]]

    def floor_bytes(self, pass_: str) -> int:
        """Bytes a pass must move at least: read q, k, v, table, index once, write out once;
        forward+backward adds reading them again with dout and writing dq, dk, dv, dtable."""
        inputs = sum(b.numel() * b.element_size() for b in self.buffers)
        inputs += self.table.numel() * self.table.element_size() + self.index.numel() * self.index.element_size()
        out = self.grad_out.numel() * self.grad_out.element_size()
        fwd = inputs + out
        if pass_ == "fwd":
            return fwd
        grads = sum(b.numel() * b.element_size() for b in self.buffers) + self.table.numel() * self.table.element_size()
        return fwd + inputs + out + grads


# ---------------------------------------------------------------------------------------------
# Implementations: f(q, k, v, table, index, scale, bias) -> [B, Nq, H*Dv] after Hardswish.
# `bias` is the pre-gathered [H, Nq, Nk] bias (forward) or None (gather inside).
# ---------------------------------------------------------------------------------------------


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def impl_op(q, k, v, table, index, scale, bias=None):
    return _merge_heads(bias_attention(q, k, v, table, index, scale=scale, activation="hardswish"))


def impl_eager(q, k, v, table, index, scale, bias=None):
    if bias is None:
        bias = table[:, index]
    attn = (q @ k.transpose(-2, -1)) * scale + bias
    attn = attn.softmax(dim=-1)
    return F.hardswish(_merge_heads(attn @ v))  # timm: reshape, then proj's Hardswish


def impl_sdpa(q, k, v, table, index, scale, bias=None):
    if bias is None:
        bias = table[:, index]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    return F.hardswish(_merge_heads(out))


def make_compiled_eager():
    return torch.compile(impl_eager, dynamic=False)


def make_flex(table: torch.Tensor, index: torch.Tensor):
    """Compiled FlexAttention + Hardswish; the score_mod closes over this pass's table and index."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, index[q_idx, kv_idx]]

    def flex(q, k, v, table_, index_, scale, bias=None):
        return F.hardswish(_merge_heads(flex_attention(q, k, v, score_mod=score_mod, scale=scale)))

    return torch.compile(flex, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _oracle(case: Case, need_grads: bool):
    """float64 reference output (and gradients of buffers and table for grad_out)."""
    leaves = [t.detach().double().requires_grad_(need_grads) for t in case.buffers + [case.table]]
    with torch.set_grad_enabled(need_grads):
        q, k, v = case.views(leaves[:-1])
        out = _merge_heads(reference.bias_attention(q, k, v, leaves[-1], case.index, case.scale, "hardswish"))
        grads = torch.autograd.grad(out, leaves, case.grad_out.double()) if need_grads else None
    return out.detach(), grads


def _make_callable(impl: str, case: Case, pass_: str):
    """A zero-argument function running one iteration, and the function used to check it."""
    fns: Dict[str, Callable] = {"op": impl_op, "eager": impl_eager, "sdpa": impl_sdpa}
    if pass_ == "fwd":
        table, buffers = case.table, case.buffers
        bias = case.table[:, case.index]  # timm's eval-mode cache, gathered outside the timing
    else:
        leaves = case.grad_leaves()
        table, buffers, bias = leaves[-1], leaves[:-1], None
    if impl == "compile":
        f = make_compiled_eager()
    elif impl == "flex":
        f = make_flex(table, case.index)
    else:
        f = fns[impl]

    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                q, k, v = case.views(buffers)
                return f(q, k, v, table, case.index, case.scale, bias)

        return run, lambda result: [result]

    def run():
        q, k, v = case.views(buffers)
        out = f(q, k, v, table, case.index, case.scale, None)
        return torch.autograd.grad(out, buffers + [table], case.grad_out)

    return run, lambda result: list(result)


def bench_case(case: Case, impls: Sequence[str], passes: Sequence[str], env: Dict, quick: bool,
               bandwidth: Optional[float]) -> List[Dict]:
    s = case.shape
    rows = []
    for pass_ in passes:
        want_out, want_grads = _oracle(case, need_grads=(pass_ != "fwd"))
        want = [want_out] if pass_ == "fwd" else list(want_grads)
        for impl in impls:
            row = common.make_row(
                env, case=s.name, model=s.model, kind=s.kind, B=case.batch, H=s.heads, Nq=s.nq, Nk=s.nk,
                Dk=s.key_dim, Dv=s.val_dim, dtype=str(case.dtype).replace("torch.", ""),
                **{"pass": pass_}, impl=impl,
            )
            common.log(f"{s.name} {pass_:7s} {impl:8s} ...")

            def prepare(impl=impl, row=row, pass_=pass_):
                if impl == "op":
                    q, k, v = case.views(case.buffers)
                    row["backend"] = select_backend(q, k, v, case.table, case.index).name
                return _make_callable(impl, case, pass_)

            # (FlexAttention has no CPU backward: measure records the error and goes on.)
            rows.append(common.measure(row, prepare, want, case.device, quick=quick,
                                       floor_bytes=case.floor_bytes(pass_), bandwidth=bandwidth))
    return rows


def run(shapes: Sequence[common.AttentionShape], *, batch: int, dtype: torch.dtype, device: torch.device,
        env: Dict, quick: bool = False, impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES) -> List[Dict]:
    """Benchmarks every shape; returns rows with `ref_speedup` = this impl's time / the op's time."""
    bandwidth = None
    if device.type == "cuda":
        common.log("measuring device-to-device copy bandwidth ...")
        bandwidth = common.measure_copy_bandwidth(device)
        env["copy_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
        common.log(f"    {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for shape in shapes:
        common.log(f"case {shape.name}: B={batch} {shape.describe()} {str(dtype).replace('torch.', '')}")
        case = Case(shape, batch, dtype, device)
        rows += bench_case(case, impls, passes, env, quick, bandwidth)
        del case
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--batch", type=int, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--shapes", nargs="+", help="names or substrings, e.g. 128s attn14 256.shrink14-7 "
                        f"(all: {' '.join(s.name for s in common.LEVIT_ATTENTION_SHAPES)})")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--quick", action="store_true", help=f"shapes {' '.join(QUICK_SHAPES)}, short timings")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json)")
    parser.add_argument("--no-verify", action="store_true", help="skip checking the shape table against timm")
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    shapes = common.select_shapes(args.shapes or (QUICK_SHAPES if args.quick else None))
    env = common.environment(device)
    print(common.describe_env(env), file=sys.stderr)
    if not args.no_verify:
        problems = common.verify_levit_shapes(sorted({s.model for s in shapes}))
        if problems:
            raise SystemExit("the LeViT shape table disagrees with timm:\n" + "\n".join(problems))

    rows = run(shapes, batch=batch, dtype=dtype, device=device, env=env, quick=args.quick,
               impls=args.impls, passes=args.passes)
    print(common.describe_env(env))
    print(table(rows))
    path = common.write_json(args.out or common.default_out_path("bench_bias_attention", env), env, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
