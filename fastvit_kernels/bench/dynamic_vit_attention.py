"""Microbenchmark of DynamicViT's attention ops at DeiT-S shapes (N = 197, H = 6, D = 64).

Lives in the package so that it runs from an installed package too; `benchmarks/bench_dynamicvit.py`
is its command line.

policy_attention (training: all tokens kept, a 0/1 keep policy masks the keys), at keep ratios
1.0, 0.7, 0.343, forward and forward+backward (gradients of q, k, v and the policy):
  op        fastvit_kernels.ops.policy_attention, default backend
  eager     DynamicViT's own code: q·kᵀ, max, exp, policy mask, the eps terms, P·v
  compile   torch.compile of `eager`
  sdpa      F.scaled_dot_product_attention with a boolean mask (kept keys and the diagonal): the
            closest built-in, but a different function (no eps terms, ≤ 1e-5 apart) and no
            policy gradient (its fwd+bwd computes q, k, v gradients only)

varlen_attention (inference after tokens were dropped with a per-image threshold: every image
keeps its own number of tokens), forward, optionally forward+backward:
  op        fastvit_kernels.ops.varlen_attention on the packed tokens
  padded    F.scaled_dot_product_attention on the batch padded to the longest image, with a
            boolean key-padding mask (what a batched model must do without varlen)
  loop      F.scaled_dot_product_attention image by image

Rows carry the time, `op x` = impl ms / op ms and the error against a float64 oracle.

    python benchmarks/bench_dynamicvit.py --level ops --quick
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.ops import policy_attention, varlen_attention
from fastvit_kernels.ops.policy_attention import select_backend as select_policy_backend
from fastvit_kernels.ops.varlen_attention import select_backend as select_varlen_backend
from fastvit_kernels.reference import policy_attention as policy_reference
from fastvit_kernels.reference import varlen_attention as varlen_reference

HEADS, TOKENS, HEAD_DIM = 6, 197, 64  # DeiT-S
KEEP_RATIOS = (1.0, 0.7, 0.343)
POLICY_IMPLS = ("op", "eager", "compile", "sdpa")
VARLEN_IMPLS = ("op", "padded", "loop")
PASSES = ("fwd", "fwd+bwd")
EPS = 1e-6

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


# ---------------------------------------------------------------------------------------------
# policy_attention
# ---------------------------------------------------------------------------------------------


class PolicyCase:
    def __init__(self, batch: int, keep: float, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.batch, self.keep, self.dtype, self.device = batch, keep, dtype, device
        g = torch.Generator().manual_seed(seed)
        # q, k, v as views of one projection, as the attention module passes them.
        qkv = torch.randn(batch, TOKENS, 3, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v = qkv.permute(2, 0, 3, 1, 4)
        # DynamicViT keeps the top `keep` fraction of the 196 patch tokens (cls always kept).
        policy = torch.zeros(batch, TOKENS)
        kept = int(round((TOKENS - 1) * keep))
        order = torch.rand(batch, TOKENS - 1, generator=g).argsort(dim=1)[:, :kept] + 1
        policy.scatter_(1, order, 1.0)
        policy[:, 0] = 1.0
        self.policy = policy.to(device)
        self.grad_out = torch.randn(batch, HEADS, TOKENS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
        self.scale = HEAD_DIM ** -0.5

    def oracle(self, need_grads: bool) -> List[torch.Tensor]:
        leaves = [t.detach().double().requires_grad_(need_grads) for t in (self.q, self.k, self.v, self.policy)]
        with torch.set_grad_enabled(need_grads):
            out = policy_reference.policy_attention_eager(*leaves, self.scale, EPS)
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.double()))


def policy_eager(q, k, v, policy, scale):
    return policy_reference.policy_attention_eager(q, k, v, policy, scale, EPS)


def policy_sdpa(q, k, v, policy, scale):
    N = q.shape[2]
    mask = policy.bool()[:, None, None, :] | torch.eye(N, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _policy_callable(impl: str, case: PolicyCase, pass_: str):
    if impl == "op":
        f = lambda q, k, v, p, s: policy_attention(q, k, v, p, scale=s)  # noqa: E731
    elif impl == "compile":
        f = torch.compile(policy_eager, dynamic=False)
    else:
        f = {"eager": policy_eager, "sdpa": policy_sdpa}[impl]
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return [f(case.q, case.k, case.v, case.policy, case.scale)]
        return run
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    policy = case.policy.detach().requires_grad_(impl != "sdpa")
    inputs = leaves + ([policy] if impl != "sdpa" else [])

    def run():
        out = f(*leaves, policy, case.scale)
        return list(torch.autograd.grad(out, inputs, case.grad_out))

    return run


def bench_policy(batch: int, keeps: Sequence[float], impls: Sequence[str], passes: Sequence[str],
                 dtype: torch.dtype, device: torch.device, env: Dict, quick: bool) -> List[Dict]:
    rows = []
    for keep in keeps:
        case = PolicyCase(batch, keep, dtype, device)
        name = f"policy.keep{keep:g}"
        common.log(f"case {name}: B={batch} H={HEADS} N={TOKENS} D={HEAD_DIM} {str(dtype).replace('torch.', '')}")
        for pass_ in passes:
            want = case.oracle(need_grads=pass_ != "fwd")
            for impl in impls:
                row = common.make_row(env, case=name, op="policy_attention", keep=keep, B=batch, H=HEADS,
                                      N=TOKENS, D=HEAD_DIM, dtype=str(dtype).replace("torch.", ""),
                                      **{"pass": pass_}, impl=impl)
                common.log(f"{name} {pass_:7s} {impl:8s} ...")

                def prepare(impl=impl, row=row, pass_=pass_, case=case):
                    if impl == "op":
                        row["backend"] = select_policy_backend(case.q, case.k, case.v, case.policy, case.scale, EPS).name
                    return _policy_callable(impl, case, pass_), list

                # (sdpa has no policy gradient: it is compared on the q, k, v gradients.)
                rows.append(common.measure(row, prepare, want, device, quick=quick))
        del case
    return rows


# ---------------------------------------------------------------------------------------------
# varlen_attention
# ---------------------------------------------------------------------------------------------


def threshold_lengths(batch: int, seed: int = 0) -> List[int]:
    """Token counts of images after threshold pruning: spread around DynamicViT-S's last-stage
    fixed count (68) up to the full 197, as per-image keeping gives."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, TOKENS + 1, (batch,), generator=g).tolist()


class VarlenCase:
    def __init__(self, lengths: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.lengths, self.dtype, self.device = list(lengths), dtype, device
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths)
        qkv = torch.randn(total, 3, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
        self.q, self.k, self.v = qkv.unbind(1)
        self.cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        self.max_len = max(lengths)
        self.grad_out = torch.randn(total, HEADS, HEAD_DIM, generator=g).to(device=device, dtype=dtype)
        self.scale = HEAD_DIM ** -0.5
        # padded layout: [B, H, Lmax, D] and the key-padding mask
        B = len(lengths)
        self.index = torch.cat([b * self.max_len + torch.arange(n) for b, n in enumerate(lengths)]).to(device)
        valid = torch.zeros(B * self.max_len, dtype=torch.bool, device=device)
        valid[self.index] = True
        self.key_mask = valid.view(B, 1, 1, self.max_len)

    def oracle(self, need_grads: bool) -> List[torch.Tensor]:
        leaves = [t.detach().double().requires_grad_(need_grads) for t in (self.q, self.k, self.v)]
        with torch.set_grad_enabled(need_grads):
            out = varlen_reference.varlen_attention_eager(*leaves, self.cu.cpu(), self.scale)
            if not need_grads:
                return [out.detach()]
            return list(torch.autograd.grad(out, leaves, self.grad_out.double()))

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[T, H, D] packed -> [B, H, Lmax, D] (zeros in the padding)."""
        B = len(self.lengths)
        buf = t.new_zeros(B * self.max_len, HEADS, HEAD_DIM)
        buf[self.index] = t
        return buf.view(B, self.max_len, HEADS, HEAD_DIM).transpose(1, 2)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)[self.index]


def _varlen_callable(impl: str, case: VarlenCase, pass_: str):
    def op(q, k, v):
        return varlen_attention(q, k, v, case.cu, case.max_len, scale=case.scale)

    def padded(q, k, v):
        out = F.scaled_dot_product_attention(case.pad(q), case.pad(k), case.pad(v), attn_mask=case.key_mask,
                                             scale=case.scale)
        return case.unpad(out)

    bounds = case.cu.tolist()

    def loop(q, k, v):
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=case.scale).transpose(0, 1))
        return torch.cat(outs)

    f = {"op": op, "padded": padded, "loop": loop}[impl]
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return [f(case.q, case.k, case.v)]
        return run
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]

    def run():
        return list(torch.autograd.grad(f(*leaves), leaves, case.grad_out))

    return run


def bench_varlen(batch: int, impls: Sequence[str], passes: Sequence[str], dtype: torch.dtype,
                 device: torch.device, env: Dict, quick: bool) -> List[Dict]:
    rows = []
    for name, lengths in (("varlen.threshold", threshold_lengths(batch)), ("varlen.fixed68", [68] * batch)):
        case = VarlenCase(lengths, dtype, device)
        common.log(f"case {name}: {batch} images, {sum(lengths)} tokens (max {case.max_len}), H={HEADS} D={HEAD_DIM}")
        for pass_ in passes:
            want = case.oracle(need_grads=pass_ != "fwd")
            for impl in impls:
                row = common.make_row(env, case=name, op="varlen_attention", B=batch, tokens=sum(lengths),
                                      max_len=case.max_len, H=HEADS, D=HEAD_DIM,
                                      dtype=str(dtype).replace("torch.", ""), **{"pass": pass_}, impl=impl)
                common.log(f"{name} {pass_:7s} {impl:8s} ...")

                def prepare(impl=impl, row=row, pass_=pass_, case=case):
                    if impl == "op":
                        row["backend"] = select_varlen_backend(case.q, case.k, case.v, case.cu, case.max_len,
                                                               case.scale).name
                    return _varlen_callable(impl, case, pass_), list

                rows.append(common.measure(row, prepare, want, device, quick=quick))
        del case
    return rows


def run(*, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
        keeps: Sequence[float] = KEEP_RATIOS, policy_impls: Sequence[str] = POLICY_IMPLS,
        varlen_impls: Sequence[str] = VARLEN_IMPLS, passes: Sequence[str] = PASSES,
        varlen_passes: Sequence[str] = ("fwd",)) -> List[Dict]:
    rows = bench_policy(batch, keeps, policy_impls, passes, dtype, device, env, quick)
    rows += bench_varlen(batch, varlen_impls, varlen_passes, dtype, device, env, quick)
    common.add_ratios(rows, "op")
    return rows


def table(rows: List[Dict]) -> str:
    return common.kernel_table(
        rows, lambda row: ["different function; no policy grad"] if row.get("impl") == "sdpa" else [])
