"""Microbenchmark of `fastvit_kernels.ops.policy_attention` at DeiT-S shapes (N = 197, H = 6, D = 64).

DynamicViT's training attention: all tokens are kept, a 0/1 keep policy masks the keys (shapes:
docs/policy_attention.md, "Shapes in real models"). At keep ratios 1.0, 0.7, 0.343, forward and
forward+backward (gradients of q, k, v and the policy):

  op        fastvit_kernels.ops.policy_attention, default backend
  eager     DynamicViT's own code: q·kᵀ, max, exp, policy mask, the eps terms, P·v
  compile   torch.compile of `eager`
  sdpa      F.scaled_dot_product_attention with a boolean mask (kept keys and the diagonal): the
            closest built-in, but a different function (no eps terms, ≤ 1e-5 apart) and no
            policy gradient (its fwd+bwd computes q, k, v gradients only)

Rows carry the time, `op x` = impl ms / op ms and the error against a float64 oracle.
`python -m fastvit_kernels.bench.dynamic_vit` runs this with varlen_attention and the model.

    python -m fastvit_kernels.bench.policy_attention --quick
    python -m fastvit_kernels.bench.policy_attention --keeps 0.7 --passes fwd+bwd
"""

import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import policy_attention
from fastvit_kernels.ops.policy_attention import select_backend
from fastvit_kernels.reference import policy_attention as reference

HEADS, TOKENS, HEAD_DIM = 6, 197, 64  # DeiT-S
KEEP_RATIOS = (1.0, 0.7, 0.343)
IMPLS = ("op", "eager", "compile", "sdpa")
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-6

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


# ---------------------------------------------------------------------------------------------
# Implementations: f(q, k, v, policy, scale) -> [B, H, N, D]
# ---------------------------------------------------------------------------------------------


def impl_op(q, k, v, policy, scale):
    return policy_attention(q, k, v, policy, scale=scale)


def impl_eager(q, k, v, policy, scale):
    return reference.policy_attention_eager(q, k, v, policy, scale, EPS)


def impl_sdpa(q, k, v, policy, scale):
    N = q.shape[2]
    mask = policy.bool()[:, None, None, :] | torch.eye(N, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Inputs (a case for common.bench_kernel_cases and the pytest-benchmark suite)
# ---------------------------------------------------------------------------------------------


class Case:
    """Inputs at DeiT-S's shape by default (tokens, heads, head_dim: another shape)."""

    def __init__(self, batch: int, keep: float, dtype: torch.dtype, device: torch.device, seed: int = 0, *,
                 tokens: int = TOKENS, heads: int = HEADS, head_dim: int = HEAD_DIM):
        self.batch, self.keep, self.dtype, self.device = batch, keep, dtype, device
        self.tokens, self.heads, self.head_dim = tokens, heads, head_dim
        self.name = f"policy.keep{keep:g}"
        g = torch.Generator().manual_seed(seed)
        # q, k, v as views of one projection, as the attention module passes them.
        qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v = qkv.permute(2, 0, 3, 1, 4)
        # DynamicViT keeps the top `keep` fraction of the patch tokens (cls always kept).
        policy = torch.zeros(batch, tokens)
        kept = int(round((tokens - 1) * keep))
        order = torch.rand(batch, tokens - 1, generator=g).argsort(dim=1)[:, :kept] + 1
        policy.scatter_(1, order, 1.0)
        policy[:, 0] = 1.0
        self.policy = policy.to(device)
        self.grad_out = torch.randn(batch, heads, tokens, head_dim, generator=g).to(device=device, dtype=dtype)
        self.scale = head_dim ** -0.5

    def describe(self) -> str:
        return f"B={self.batch} H={self.heads} N={self.tokens} D={self.head_dim} {common.dtype_name(self.dtype)}"

    def row_fields(self) -> Dict[str, object]:
        return dict(case=self.name, op="policy_attention", keep=self.keep, B=self.batch, H=self.heads,
                    N=self.tokens, D=self.head_dim, dtype=common.dtype_name(self.dtype))

    def backend(self) -> str:
        return select_backend(self.q, self.k, self.v, self.policy, self.scale, EPS).name

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        """The reference in float64 (or `dtype`): [output], or the gradients of q, k, v and the policy."""
        leaves = [t.detach().to(dtype).requires_grad_(need_grads) for t in (self.q, self.k, self.v, self.policy)]
        with torch.set_grad_enabled(need_grads):
            out = reference.policy_attention_eager(*leaves, self.scale, EPS)
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.to(dtype)))

    def make_callable(self, impl: str, pass_: str):
        """One iteration of `impl` for the pass, returning what `oracle` returns (sdpa has no
        policy gradient: its fwd+bwd returns the q, k, v gradients, compared with the oracle's)."""
        if impl == "compile":
            f = torch.compile(impl_eager, dynamic=False)
        else:
            f = {"op": impl_op, "eager": impl_eager, "sdpa": impl_sdpa}[impl]
        if pass_ == "fwd":

            def run():
                with torch.no_grad():
                    return [f(self.q, self.k, self.v, self.policy, self.scale)]

            return run
        leaves = [t.detach().requires_grad_() for t in (self.q, self.k, self.v)]
        policy = self.policy.detach().requires_grad_(impl != "sdpa")
        inputs = leaves + ([policy] if impl != "sdpa" else [])

        def run():
            out = f(*leaves, policy, self.scale)
            return list(torch.autograd.grad(out, inputs, self.grad_out))

        return run


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run(*, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
        keeps: Sequence[float] = KEEP_RATIOS, impls: Sequence[str] = IMPLS,
        passes: Sequence[str] = PASSES, backend: Optional[str] = None, **shape) -> List[Dict]:
    """Benchmarks every keep ratio; rows get `ref_speedup` = this impl's time / the op's time.
    `backend` forces the op's backend (common.forcing_backend); `shape`: Case's tokens, heads,
    head_dim (default DeiT-S)."""
    cases = (Case(batch, keep, dtype, device, **shape) for keep in keeps)
    rows = common.bench_kernel_cases(cases, impls, passes, env, quick=quick, backend=backend)
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    """The kernel table, saying on policy_attention's sdpa rows that it is another function (also
    used for the varlen_attention and plain attention rows printed beside these)."""
    return common.kernel_table(
        rows, lambda row: ["different function; no policy grad"]
        if row.get("impl") == "sdpa" and row.get("op") == "policy_attention" else [])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEP_RATIOS))


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    return run(batch=ctx.batch, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
               keeps=args.keeps, impls=args.impls, passes=args.passes)


def report(rows: List[Dict], ctx: common.Context) -> str:
    return table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_policy_attention", batch=(64, 256), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report)


if __name__ == "__main__":
    sys.exit(main())
