"""Microbenchmark of `fastvit_kernels.ops.varlen_attention` at DeiT-S shapes (H = 6, D = 64).

DynamicViT's inference after tokens were dropped with a per-image threshold: every image keeps its
own number of tokens (shapes: docs/varlen_attention.md, "Shapes in real models"). Two cases,
`varlen.threshold` (images of 40 to 197 tokens, as threshold keeping gives) and `varlen.fixed68`
(every image 68 tokens, DynamicViT-S's last stage with top-k keeping), forward and
forward+backward:

  op        fastvit_kernels.ops.varlen_attention on the packed tokens
  padded    F.scaled_dot_product_attention on the batch padded to the longest image, with a
            boolean key-padding mask (what a batched model must do without varlen)
  loop      F.scaled_dot_product_attention image by image

Rows carry the time, `op x` = impl ms / op ms and the error against a float64 oracle.
`python -m fastvit_kernels.bench.dynamic_vit` runs this with policy_attention and the model.

    python -m fastvit_kernels.bench.varlen_attention --quick
    python -m fastvit_kernels.bench.varlen_attention --passes fwd --batch 16
"""

import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import varlen_attention
from fastvit_kernels.ops.varlen_attention import select_backend
from fastvit_kernels.reference import varlen_attention as reference

HEADS, TOKENS, HEAD_DIM = 6, 197, 64  # DeiT-S
IMPLS = ("op", "padded", "loop")
PASSES = ("fwd", "fwd+bwd")


def threshold_lengths(batch: int, seed: int = 0) -> List[int]:
    """Token counts of images after threshold pruning: spread around DynamicViT-S's last-stage
    fixed count (68) up to the full 197, as per-image keeping gives."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, TOKENS + 1, (batch,), generator=g).tolist()


def case_lengths(batch: int) -> Dict[str, List[int]]:
    """The benchmark's cases: name -> tokens per image."""
    return {"varlen.threshold": threshold_lengths(batch), "varlen.fixed68": [68] * batch}


# ---------------------------------------------------------------------------------------------
# Inputs and implementations (a case for common.bench_kernel_cases and the pytest-benchmark suite)
# ---------------------------------------------------------------------------------------------


class Case:
    """Packed images of the given lengths, at DeiT-S's heads and head width by default."""

    def __init__(self, name: str, lengths: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0, *,
                 heads: int = HEADS, head_dim: int = HEAD_DIM):
        self.name, self.lengths, self.dtype, self.device = name, list(lengths), dtype, device
        self.heads, self.head_dim = heads, head_dim
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths)
        qkv = torch.randn(total, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v = qkv.unbind(1)
        self.cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        self.bounds = self.cu.tolist()  # for `loop`, read once outside the timing
        self.max_len = max(lengths)
        self.grad_out = torch.randn(total, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        self.scale = head_dim ** -0.5
        # padded layout: [B, H, Lmax, D] and the key-padding mask
        B = len(lengths)
        self.index = torch.cat([b * self.max_len + torch.arange(n) for b, n in enumerate(lengths)]).to(device)
        valid = torch.zeros(B * self.max_len, dtype=torch.bool, device=device)
        valid[self.index] = True
        self.key_mask = valid.view(B, 1, 1, self.max_len)

    def describe(self) -> str:
        return (f"{len(self.lengths)} images, {sum(self.lengths)} tokens (max {self.max_len}), H={self.heads} "
                f"D={self.head_dim} {common.dtype_name(self.dtype)}")

    def row_fields(self) -> Dict[str, object]:
        return dict(case=self.name, op="varlen_attention", B=len(self.lengths), tokens=sum(self.lengths),
                    max_len=self.max_len, H=self.heads, D=self.head_dim, dtype=common.dtype_name(self.dtype))

    def backend(self) -> str:
        return select_backend(self.q, self.k, self.v, self.cu, self.max_len, self.scale).name

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        """The reference in float64 (or `dtype`): [output], or the gradients of q, k, v."""
        leaves = [t.detach().to(dtype).requires_grad_(need_grads) for t in (self.q, self.k, self.v)]
        with torch.set_grad_enabled(need_grads):
            out = reference.varlen_attention_eager(*leaves, self.cu.cpu(), self.scale)
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.to(dtype)))

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[T, H, D] packed -> [B, H, Lmax, D] (zeros in the padding)."""
        B = len(self.lengths)
        buf = t.new_zeros(B * self.max_len, self.heads, self.head_dim)
        buf[self.index] = t
        return buf.view(B, self.max_len, self.heads, self.head_dim).transpose(1, 2)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, self.heads, self.head_dim)[self.index]

    def impl_op(self, q, k, v):
        return varlen_attention(q, k, v, self.cu, self.max_len, scale=self.scale)

    def impl_padded(self, q, k, v):
        out = F.scaled_dot_product_attention(self.pad(q), self.pad(k), self.pad(v), attn_mask=self.key_mask,
                                             scale=self.scale)
        return self.unpad(out)

    def impl_loop(self, q, k, v):
        outs = []
        for start, end in zip(self.bounds[:-1], self.bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=self.scale).transpose(0, 1))
        return torch.cat(outs)

    def make_callable(self, impl: str, pass_: str):
        """One iteration of `impl` for the pass, returning what `oracle` returns."""
        f = {"op": self.impl_op, "padded": self.impl_padded, "loop": self.impl_loop}[impl]
        if pass_ == "fwd":

            def run():
                with torch.no_grad():
                    return [f(self.q, self.k, self.v)]

            return run
        leaves = [t.detach().requires_grad_() for t in (self.q, self.k, self.v)]

        def run():
            return list(torch.autograd.grad(f(*leaves), leaves, self.grad_out))

        return run


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(*, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
        impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES, backend: Optional[str] = None,
        lengths: Optional[Dict[str, Sequence[int]]] = None, **shape) -> List[Dict]:
    """Benchmarks both cases (or `lengths`: case name -> tokens per image); rows get `ref_speedup`
    = this impl's time / the op's time. `backend` forces the op's backend (common.forcing_backend);
    `shape`: Case's heads, head_dim (default DeiT-S)."""
    lengths = case_lengths(batch) if lengths is None else lengths
    cases = (Case(name, per_image, dtype, device, **shape) for name, per_image in lengths.items())
    rows = common.bench_kernel_cases(cases, impls, passes, env, quick=quick, backend=backend)
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(rows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def run_from_args(ctx: common.Context) -> List[Dict]:
    return run(batch=ctx.batch, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
               impls=ctx.args.impls, passes=ctx.args.passes)


def report(rows: List[Dict], ctx: common.Context) -> str:
    return table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_varlen_attention", batch=(64, 256), impls=IMPLS, passes=PASSES,
                       run=run_from_args, report=report)


if __name__ == "__main__":
    sys.exit(main())
