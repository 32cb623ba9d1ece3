"""Microbenchmark of `fastvit_kernels.ops.bias_attention` at every LeViT attention shape.

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

    python -m fastvit_kernels.bench.bias_attention --quick
    python -m fastvit_kernels.bench.bias_attention --shapes 128s.attn14 256.attn14 --passes fwd
"""

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.ops.bias_attention import select_backend
from fastvit_kernels.reference import bias_attention as reference

IMPLS = ("op", "eager", "sdpa", "compile", "flex")
PASSES = ("fwd", "fwd+bwd")
QUICK_SHAPES = ("128s.attn14", "128s.shrink14-7")

# Each case compiles new graphs for `compile` and `flex` (20 shapes x passes in a full run): raise
# dynamo's recompile limit so none silently falls back to eager, and never use dynamic shapes.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


# ---------------------------------------------------------------------------------------------
# LeViT attention shapes (docs/bias_attention.md, "Shapes in real models"; 224x224 input)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    """One distinct attention call of a LeViT model (B is chosen by the benchmark)."""

    name: str  # e.g. "128s.attn14" (block attention on the 14x14 grid), "128s.shrink14-7"
    model: str  # timm model name
    kind: str  # "block" (Attention) or "shrink" (AttentionDownsample)
    heads: int
    resolution: int  # the key grid side R (keys are R x R tokens)
    key_dim: int
    val_dim: int
    count: int  # how many modules of the model have this shape
    width: Optional[int] = None  # key grid columns when not square (LeViT's grids are square)

    @property
    def stride(self) -> int:
        return 1 if self.kind == "block" else 2

    @property
    def grid(self) -> Tuple[int, int]:
        """The key grid (rows, columns)."""
        return self.resolution, self.width or self.resolution

    @property
    def nk(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def nq(self) -> int:
        rows, cols = self.grid
        return -(-rows // self.stride) * -(-cols // self.stride)

    @property
    def table_size(self) -> int:
        return self.nk

    def describe(self) -> str:
        return f"H={self.heads} Nq={self.nq} Nk={self.nk} Dk={self.key_dim} Dv={self.val_dim}"


def _levit_shapes(model: str, tag: str, heads, shrink_heads, key_dim, depth) -> List[AttentionShape]:
    grids = (14, 7, 4)
    shapes = []
    for stage, (h, r) in enumerate(zip(heads, grids)):
        if stage > 0:
            rin = grids[stage - 1]
            shapes.append(
                AttentionShape(f"{tag}.shrink{rin}-{r}", model, "shrink", shrink_heads[stage - 1], rin, key_dim, 4 * key_dim, 1)
            )
        shapes.append(AttentionShape(f"{tag}.attn{r}", model, "block", h, r, key_dim, 2 * key_dim, depth[stage]))
    return shapes


# From the table in docs/bias_attention.md, "Shapes in real models": heads per stage, Dk, Dv = 2 Dk;
# shrinks have H = C_in // Dk, Dv = 4 Dk.
LEVIT_ATTENTION_SHAPES: Tuple[AttentionShape, ...] = tuple(
    _levit_shapes("levit_128s", "128s", (4, 6, 8), (128 // 16, 256 // 16), 16, (2, 3, 4))
    + _levit_shapes("levit_256", "256", (4, 6, 8), (256 // 32, 384 // 32), 32, (4, 4, 4))
)


def select_shapes(patterns: Optional[Sequence[str]]) -> List[AttentionShape]:
    """Shapes whose name contains any of the patterns (all when None/empty); e.g. '128s', 'attn14'."""
    return common.select_by_name(LEVIT_ATTENTION_SHAPES, patterns)


def levit_bias_index(resolution, stride: int, device=None) -> torch.Tensor:
    """The LeViT index of a square `resolution` grid, or of a (rows, columns) grid (the modules'
    own function; docs/bias_attention.md, "Definition")."""
    from fastvit_kernels.modules.bias_attention import levit_bias_index as index_of_grid

    grid = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    return index_of_grid(grid, stride, device)


def verify_levit_shapes(models: Sequence[str]) -> List[str]:
    """Compares LEVIT_ATTENTION_SHAPES (and levit_bias_index) with timm's modules; returns problems."""
    import timm
    from timm.models.levit import Attention, AttentionDownsample

    problems = []
    for model_name in models:
        model = timm.create_model(model_name, pretrained=False)
        found: Dict[Tuple, int] = {}
        for name, module in model.named_modules():
            if not isinstance(module, (Attention, AttentionDownsample)):
                continue
            kind = "block" if isinstance(module, Attention) else "shrink"
            r = module.resolution[0] if isinstance(module.resolution, tuple) else module.resolution
            key = (kind, module.num_heads, r, module.key_dim, module.val_dim)
            found[key] = found.get(key, 0) + 1
            idx = levit_bias_index(r, 1 if kind == "block" else module.stride)
            if not torch.equal(idx, module.attention_bias_idxs.cpu()):
                problems.append(f"{model_name}.{name}: bias index differs from levit_bias_index")
        ours = {
            (s.kind, s.heads, s.resolution, s.key_dim, s.val_dim): s.count
            for s in LEVIT_ATTENTION_SHAPES
            if s.model == model_name
        }
        if not ours:
            problems.append(f"{model_name}: no shapes in LEVIT_ATTENTION_SHAPES")
        elif ours != found:
            problems.append(f"{model_name}: timm has {found}, the table has {ours}")
    return problems


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
# Inputs (a case for common.bench_kernel_cases and the pytest-benchmark suite)
# ---------------------------------------------------------------------------------------------


class Case:
    """Inputs for one shape: fused projection buffers, bias table and index, an output gradient."""

    def __init__(self, shape: AttentionShape, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.batch, self.dtype, self.device = shape, batch, dtype, device
        self.name = shape.name
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
        self.index = levit_bias_index(s.grid, s.stride, device=device)
        self.grad_out = randn(batch, s.nq, s.heads * s.val_dim)
        self.scale = s.key_dim**-0.5

    def describe(self) -> str:
        return f"B={self.batch} {self.shape.describe()} {common.dtype_name(self.dtype)}"

    def row_fields(self) -> Dict[str, object]:
        s = self.shape
        return dict(case=s.name, model=s.model, kind=s.kind, B=self.batch, H=s.heads, Nq=s.nq, Nk=s.nk,
                    Dk=s.key_dim, Dv=s.val_dim, dtype=common.dtype_name(self.dtype))

    def views(self, buffers: Sequence[torch.Tensor]):
        """q, k, v as [B, H, N, D] strided views of the buffers (no copies), as timm makes them."""
        s = self.shape
        if s.kind == "block":
            q, k, v = buffers[0].split([s.key_dim, s.key_dim, s.val_dim], dim=3)
        else:
            q = buffers[0].view(self.batch, s.nq, s.heads, s.key_dim)
            k, v = buffers[1].split([s.key_dim, s.val_dim], dim=3)
        return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)

    def backend(self) -> str:
        q, k, v = self.views(self.buffers)
        return select_backend(q, k, v, self.table, self.index).name

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

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        """The reference in float64 (or `dtype`): [output], or the gradients of the buffers and the
        table for grad_out."""
        leaves = [t.detach().to(dtype).requires_grad_(need_grads) for t in self.buffers + [self.table]]
        with torch.set_grad_enabled(need_grads):
            q, k, v = self.views(leaves[:-1])
            out = _merge_heads(reference.bias_attention(q, k, v, leaves[-1], self.index, self.scale, "hardswish"))
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.to(dtype)))

    def make_callable(self, impl: str, pass_: str):
        """One iteration of `impl` for the pass, returning what `oracle` returns."""
        leaves = common.pass_leaves(pass_, self.buffers + [self.table])
        buffers, table = leaves[:-1], leaves[-1]
        # Forward: timm's eval-mode cache, gathered outside the timing; fwd+bwd gathers inside.
        bias = self.table[:, self.index] if pass_ == "fwd" else None
        if impl == "compile":
            f = make_compiled_eager()
        elif impl == "flex":
            f = make_flex(table, self.index)
        else:
            f = {"op": impl_op, "eager": impl_eager, "sdpa": impl_sdpa}[impl]

        def call():
            q, k, v = self.views(buffers)
            return f(q, k, v, table, self.index, self.scale, bias)

        return common.pass_runner(pass_, call, leaves, self.grad_out)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(shapes: Sequence[AttentionShape], *, batch: int, dtype: torch.dtype, device: torch.device,
        env: Dict, quick: bool = False, impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES,
        backend: Optional[str] = None) -> List[Dict]:
    """Benchmarks every shape; returns rows with `ref_speedup` = this impl's time / the op's time.
    (FlexAttention has no CPU backward: its fwd+bwd rows record the error.) `backend` forces the
    op's backend (common.forcing_backend); default: its automatic choice."""
    bandwidth = common.copy_bandwidth(device, env) if device.type == "cuda" else None
    cases = (Case(shape, batch, dtype, device) for shape in shapes)
    rows = common.bench_kernel_cases(cases, impls, passes, env, quick=quick, bandwidth=bandwidth, backend=backend)
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(rows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--shapes", nargs="+", help="names or substrings, e.g. 128s attn14 256.shrink14-7 "
                        f"(all: {' '.join(s.name for s in LEVIT_ATTENTION_SHAPES)})")
    parser.add_argument("--no-verify", action="store_true", help="skip checking the shape table against timm")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    shapes = select_shapes(args.shapes or (QUICK_SHAPES if args.quick else None))
    if not args.no_verify:
        problems = verify_levit_shapes(sorted({s.model for s in shapes}))
        if problems:
            raise SystemExit("the LeViT shape table disagrees with timm:\n" + "\n".join(problems))
    return run(shapes, batch=ctx.batch, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
               impls=args.impls, passes=args.passes)


def report(rows: List[Dict], ctx: common.Context) -> str:
    return table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_bias_attention", batch=(64, 256), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       quick_help=f"shapes {' '.join(QUICK_SHAPES)}, short timings")


if __name__ == "__main__":
    sys.exit(main())
