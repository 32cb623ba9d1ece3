"""Eager per-call overhead of each op: median µs of one call on a tiny input, against torch.softmax.

On inputs this small the arithmetic is negligible, so the time is what a call costs before any
work: Python wrapper, argument checks, backend choice, dispatcher, output allocation. Each op is
timed with grad off (inference) and with an input that requires grad (the autograd path), and
through its public function (fastvit_kernels.ops.<op>) and, for the native backend, the dispatcher
op it ends in (torch.ops.fastvit_kernels.<op>_forward, what a compiled graph or an AOTInductor
package calls).

    python -m fastvit_kernels.bench.overhead
"""

import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastvit_kernels.bench import common


def cases(grad: bool) -> Dict[str, Callable[[], object]]:
    """name -> a call on a tiny input (inputs require grad when `grad`)."""
    from fastvit_kernels import ops

    def t(*shape):
        return torch.randn(*shape).requires_grad_(grad)

    q = t(1, 1, 4, 16)
    table, index = t(1, 4), torch.randint(0, 4, (4, 4))
    cost, v = t(1, 3, 3, 2, 1), t(1, 3, 3, 1, 8)
    policy = torch.ones(1, 4)
    qv, cu = t(4, 1, 16), torch.tensor([0, 2, 4], dtype=torch.int32)
    x, p = torch.rand(1, 4, 16).requires_grad_(grad), torch.full((2,), 3.0)
    native = torch.ops.fastvit_kernels
    out = {
        "torch.softmax": lambda: torch.softmax(q, -1),
        "bias_attention": lambda: ops.bias_attention(q, q, q, table, index),
        "bias_attention (no bias)": lambda: ops.bias_attention(q, q, q),
        "qna_attention": lambda: ops.qna_attention(cost, v, kernel_size=3),
        "policy_attention": lambda: ops.policy_attention(q, q, q, policy),
        "varlen_attention": lambda: ops.varlen_attention(qv, qv, qv, cu, 2),
        "ggem_pool": lambda: ops.ggem_pool(x, p, groups=2),
    }
    if hasattr(native, "bias_attention_forward"):
        out["dispatcher: bias_attention_forward"] = lambda: native.bias_attention_forward(
            q, q, q, table, index, None, 0.25, "none", False)
    return out


def run(env: Dict, quick: bool) -> List[Dict]:
    rows = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for name, fn in cases(grad).items():
                row = common.make_row(env, case=name, impl="grad" if grad else "no grad")
                try:
                    row["us"] = common.benchmark_ms(fn, torch.device("cpu"), quick=quick)["ms"] * 1e3
                except Exception as error:  # an op missing on this build
                    row["error"] = common.short_error(error)
                rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["case"] == "torch.softmax" and r["impl"] == row["impl"])
        row["x_softmax"] = row["us"] / base["us"] if row.get("us") else None
    return rows


COLUMNS = [
    common.Column("case", "call", left=True),
    common.Column("impl", "grad", left=True),
    common.Column("us", "µs", "{:.1f}"),
    common.Column("x_softmax", "x softmax", "{:.1f}"),
    common.Column("note", "note", left=True),
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="overhead", run=lambda ctx: run(ctx.env, ctx.quick),
                       report=lambda rows, ctx: common.noted_table(rows, COLUMNS),
                       dtype_help="ignored: float32 inputs")


if __name__ == "__main__":
    sys.exit(main())
