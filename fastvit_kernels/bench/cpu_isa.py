"""bf16 attention kernels at a bf16-product CPU ISA level (amx, else avx512bf16) against the
avx512 level, which multiplies in fp32 (kernel level).

The C++ ops themselves (torch.ops.fastvit_kernels.<op>_forward / _backward, without the Python
op layer or autograd): forward and forward+backward of bias_attention (LeViT stage-1 shapes),
policy_attention and varlen_attention (DeiT-S-like), batch 1 and 32. Each (case, ISA) is timed as
the minimum over --reps runs, the ISAs alternating run by run so that load drift hits both alike;
rows carry the load average when measured.

    python -m fastvit_kernels.bench.cpu_isa [--threads 1] [--reps 15] [--level amx|avx512bf16]
"""

import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

import fastvit_kernels  # noqa: F401  (registers the ops)
from fastvit_kernels import _native
from fastvit_kernels.bench import common
from fastvit_kernels.info import BF16_PRODUCT_LEVELS

OPS = torch.ops.fastvit_kernels
BF16 = torch.bfloat16


def levit_index(n):
    side = int(round(n ** 0.5))
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    return (y[:, None] - y[None]).abs() * side + (x[:, None] - x[None]).abs()


def bias_case(B, H, N, Dk, Dv):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, H, 2 * Dk + Dv, generator=g).to(BF16)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([Dk, Dk, Dv], dim=3))
    table = (4 * torch.randn(H, N, generator=g)).to(BF16)
    index = levit_index(N)
    scale = Dk ** -0.5

    def fwd():
        return OPS.bias_attention_forward(q, k, v, table, index, None, scale, "hardswish", True)

    def fwd_bwd():
        out, o_pre, lse = OPS.bias_attention_forward(q, k, v, table, index, None, scale, "hardswish", True)
        return OPS.bias_attention_backward(torch.ones_like(out), q, k, v, table, index, None, o_pre, lse,
                                           scale, "hardswish")
    return fwd, fwd_bwd


def policy_case(B, H, N, D):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(BF16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    policy = (torch.rand(B, N, generator=g) < 0.7).float()
    policy[:, 0] = 1
    scale, eps = D ** -0.5, 1e-6

    def fwd():
        return OPS.policy_attention_forward(q, k, v, policy, scale, eps)

    def fwd_bwd():
        out, row_max, denom, arg = OPS.policy_attention_forward(q, k, v, policy, scale, eps)
        return OPS.policy_attention_backward(torch.ones_like(out), q, k, v, policy, out, row_max,
                                             denom, arg, scale, eps, True)
    return fwd, fwd_bwd


def varlen_case(B, H, N, D):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B * N, 3, H, D, generator=g).to(BF16)
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, B * N + 1, N, dtype=torch.int64)
    scale = D ** -0.5

    def fwd():
        return OPS.varlen_attention_forward(q, k, v, cu, N, scale)

    def fwd_bwd():
        out, lse = OPS.varlen_attention_forward(q, k, v, cu, N, scale)
        return OPS.varlen_attention_backward(torch.ones_like(out), q, k, v, out, lse, cu, N, scale)
    return fwd, fwd_bwd


def cases():
    for B in (1, 32):
        yield f"bias levit_128s s1 B={B} H=4 N=196 Dk=16 Dv=64", bias_case(B, 4, 196, 16, 64)
        yield f"bias levit_256 s1 B={B} H=4 N=196 Dk=32 Dv=128", bias_case(B, 4, 196, 32, 128)
        yield f"bias levit_384 s1 B={B} H=6 N=196 Dk=32 Dv=128", bias_case(B, 6, 196, 32, 128)
        yield f"policy deit-s B={B} H=6 N=197 D=64", policy_case(B, 6, 197, 64)
        yield f"varlen deit-s B={B} H=6 N=197 D=64", varlen_case(B, 6, 197, 64)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn, isas, reps):
    best = {isa: float("inf") for isa in isas}
    for isa in isas:  # warm-up (buffers, tile permission, caches)
        _native.native.set_cpu_isa(isa)
        fn(), fn()
    for _ in range(reps):
        for isa in isas:
            _native.native.set_cpu_isa(isa)
            best[isa] = min(best[isa], timed(fn))
    _native.native.set_cpu_isa("auto")
    return best


def run(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    torch.set_num_threads(args.threads)
    supported = _native.native.supported_isas()
    level = args.level or next((lv for lv in BF16_PRODUCT_LEVELS if lv in supported), None)
    isas = ["avx512", level]
    missing = [i for i in isas if i not in supported]
    if missing:
        raise SystemExit(f"this machine or build lacks the ISA levels {missing} (it runs {supported})")
    rows = []
    for name, (fwd, fwd_bwd) in cases():
        for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            best = measure(fn, isas, args.reps)
            row = common.make_row(ctx.env, case=name, **{"pass": label}, impl=level, dtype="bfloat16",
                                  threads=args.threads, avx512_us=best["avx512"] * 1e6,
                                  level_us=best[level] * 1e6, load1=round(os.getloadavg()[0], 2))
            row["speedup"] = row["avx512_us"] / row["level_us"]
            common.log(f"{name} {label}: {level} {row['speedup']:.2f}x avx512")
            rows.append(row)
    return rows


COLUMNS = [
    common.Column("case", "case", left=True),
    common.Column("pass", "pass", left=True),
    common.Column("impl", "level", left=True),
    common.Column("avx512_us", "avx512 µs", "{:.0f}"),
    common.Column("level_us", "level µs", "{:.0f}"),
    common.Column("speedup", "avx512/level", "{:.2f}"),
    common.Column("load1", "load"),
]


def add_options(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=15, help="timed runs per case and ISA (min taken)")
    parser.add_argument("--level", choices=tuple(BF16_PRODUCT_LEVELS), default=None,
                        help="the bf16-product level to time (default: amx where the CPU has it, else avx512bf16)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_cpu_isa", run=run,
                       report=lambda rows, ctx: common.format_table(rows, COLUMNS), add_options=add_options,
                       dtype_help="ignored: bfloat16")


if __name__ == "__main__":
    sys.exit(main())
