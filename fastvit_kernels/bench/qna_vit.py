"""End-to-end QnA-ViT images/s: the model as shipped against the same model in plain PyTorch.

Variants of one randomly initialised model (same weights), inference (eval, inference_mode) and a
training step (forward, cross-entropy, backward, SGD step):

  fused           fastvit_kernels.models.qna_vit as shipped: the fused qna_attention and
                  bias_attention ops on their default backends
  unfold          every QnA attention as the naive unfold formulation and every window attention
                  as plain PyTorch (q kᵀ + gathered bias, softmax, v): QnA-ViT in plain PyTorch
  conv            the same with the QnA attention as the JAX code's two grouped convolutions
  compile-unfold  torch.compile of `unfold`
  compile-conv    torch.compile of `conv`
  compile-fused   torch.compile of `fused` (the ops stay opaque; compile fuses around them)

Each variant's output is compared with the float64 `unfold` model before it is timed.

    python -m fastvit_kernels.bench.qna_vit --quick
    python -m fastvit_kernels.bench.qna_vit --model qna_vit_tiny_7x7 --passes infer
"""

import contextlib
import copy
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common
from fastvit_kernels.bench.qna_attention import qna_attention_swapped
from fastvit_kernels.reference import bias_attention as bias_reference

IMPLS = ("fused", "unfold", "conv", "compile-unfold", "compile-conv", "compile-fused")
PASSES = ("infer", "train")
MODELS = ("qna_vit_tiny", "qna_vit_tiny_7x7", "qna_vit_small", "qna_vit_base")
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


def _plain_bias_attention(q, k, v, bias_table=None, bias_index=None, *, scale=None, activation=None):
    return bias_reference.bias_attention(q, k, v, bias_table, bias_index, scale, activation)


@contextlib.contextmanager
def plain_pytorch(formulation: str):
    """The models' attention steps as plain PyTorch (formulation 'unfold' or 'conv') in the block;
    'fused' leaves the ops in place."""
    from fastvit_kernels.models import qna_vit

    if formulation in ("fused", "op"):
        yield
        return
    original = qna_vit.bias_attention
    qna_vit.bias_attention = _plain_bias_attention
    try:
        with qna_attention_swapped(formulation):
            yield
    finally:
        qna_vit.bias_attention = original


def build(model_name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from fastvit_kernels.models import qna_vit

    torch.manual_seed(seed)
    model = getattr(qna_vit, model_name)()
    with torch.no_grad():  # trained-looking position parameters (rpe and bias tables start at 0)
        for name, p in model.named_parameters():
            if name.endswith(("rpe", "relative_position_bias_table")):
                p.normal_(std=1.0)
    return model.to(device)


def run(model_name: str, *, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool,
        impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES) -> List[Dict]:
    base = build(model_name, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(0, base.num_classes, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), plain_pytorch("unfold"):
        oracle = copy.deepcopy(base).double().eval()(x.double())
    rows = []
    for pass_ in passes:
        for impl in impls:
            row = common.make_row(env, case=model_name, **{"pass": pass_}, impl=impl, B=batch,
                                  dtype=common.dtype_name(dtype))
            common.log(f"{model_name} {pass_} {impl} (batch {batch}) ...")
            compiled = impl.startswith("compile-")
            formulation = impl[len("compile-"):] if compiled else impl

            def prepare():
                model = copy.deepcopy(base).train(pass_ == "train")
                runnable = torch.compile(model, dynamic=False) if compiled else model
                if pass_ == "infer":

                    def step():
                        with torch.inference_mode(), autocast, plain_pytorch(formulation):
                            return runnable(x)

                    return step
                opt = torch.optim.SGD(model.parameters(), lr=1e-4)

                def step():
                    opt.zero_grad(set_to_none=True)
                    with autocast, plain_pytorch(formulation):
                        out = runnable(x)
                        loss = F.cross_entropy(out.float(), labels)
                    loss.backward()
                    opt.step()
                    return out

                return step

            def check(out):
                if pass_ == "infer":  # train mode has drop path: outputs are random
                    row["max_rel_err"] = common.rel_err(out.float(), oracle)

            rows.append(common.measure_model(row, prepare, device, images=batch, quick=quick,
                                             min_run_time=1.0 if quick else 3.0, check=check))
    common.add_ratios(rows, "fused")
    return rows


COLUMNS = [
    common.Column("case", "model", left=True),
    common.Column("pass", "pass", left=True),
    common.Column("impl", "impl", left=True),
    common.Column("img_per_s", "img/s", "{:.1f}"),
    common.Column("ms", "ms", "{:.1f}"),
    common.Column("ref_speedup", "fused x", "{:.2f}"),
    common.Column("max_rel_err", "rel err", "{:.1e}"),
    common.Column("first_call_s", "1st s", "{:.1f}"),
    common.Column("note", "note", left=True),
]


def table(rows: List[Dict]) -> str:
    return common.noted_table(rows, COLUMNS)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--model", choices=MODELS, default="qna_vit_tiny")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    return run(args.model, batch=ctx.batch, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
               impls=args.impls, passes=args.passes)


def report(rows: List[Dict], ctx: common.Context) -> str:
    return table(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_qna_vit", batch=(32, 256), impls=IMPLS, passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       dtype_help="default: float32 on CPU, float16 (autocast) on CUDA")


if __name__ == "__main__":
    sys.exit(main())
