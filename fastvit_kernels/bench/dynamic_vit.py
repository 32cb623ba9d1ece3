"""DynamicViT benchmarks: its attention ops at DeiT-S shapes and DynamicViT-S vs DeiT-S images/s.

  --level ops    policy_attention (fastvit_kernels/bench/policy_attention.py) at keep ratios 1.0,
                 0.7, 0.343 and varlen_attention (fastvit_kernels/bench/varlen_attention.py),
                 against their peers, in one table; and the plain attention of top-k inference
                 (every image keeps the same 197 / 138 / 97 / 68 tokens): `op` = bias_attention
                 without a bias, what MaskedTokenAttention runs there without grad on CPU, against
                 `sdpa` = timm's F.scaled_dot_product_attention (forward)
  --level model  end to end, below (this module)
  --level all    both (the default)

End to end: one randomly initialised DeiT-S (timm `deit_small_patch16_224`) and a DynamicViT-S with the same
backbone weights (`load_backbone`). The score predictors are random; their last layer is drawn
4x wider than the default init so that keep probabilities spread out as a trained predictor's do
(the default init gives every token ~0.5, and a threshold then keeps all or nothing). Variants:

  deit_s             timm's DeiT-S (F.scaled_dot_product_attention)
  deit_s.compile     torch.compile of it
  dyvit.topk         DynamicViT-S as shipped, the paper's inference: the same number of tokens
                     per image (197 -> 138 -> 97 -> 68), dense batches
  dyvit.threshold    DynamicViT-S keeping each image's tokens whose keep probability passes a
                     threshold: packed tokens through varlen_attention (token counts differ per
                     image). With random predictors the threshold is calibrated first so that
                     the images keep 68 tokens on average after the last stage, as top-k does.
  dyvit.plain        (training) DynamicViT-S with the attention in plain PyTorch: DynamicViT's
                     own softmax_with_policy formula (MaskedTokenAttention.fused = False)
  dyvit.fused        (training) DynamicViT-S as shipped: policy_attention

Inference runs in eval mode under torch.inference_mode; a training step is forward, cross-entropy
on the logits (plus DynamicViT's keep-ratio loss for DynamicViT), backward. Rows carry images/s
and `x deit_s` = this variant's images/s / DeiT-S's at the same batch and pass.

    python -m fastvit_kernels.bench.dynamic_vit --quick
    python -m fastvit_kernels.bench.dynamic_vit --level model --quick
    python -m fastvit_kernels.bench.dynamic_vit --level ops --keeps 0.7 --passes fwd+bwd
"""

import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastvit_kernels.bench import common, policy_attention, varlen_attention
from fastvit_kernels.ops import bias_attention
from fastvit_kernels.ops.bias_attention import select_backend

INFER_IMPLS = ("deit_s", "deit_s.compile", "dyvit.topk", "dyvit.threshold")
TRAIN_IMPLS = ("deit_s", "dyvit.plain", "dyvit.fused")
PASSES = ("infer", "train")
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def build_models(device: torch.device, dtype: torch.dtype, seed: int = 0):
    import timm

    from fastvit_kernels.models.dynamic_vit import dynamicvit_deit_small

    torch.manual_seed(seed)
    deit = timm.create_model("deit_small_patch16_224").to(device, dtype)
    dyvit = dynamicvit_deit_small().to(device, dtype)
    dyvit.load_backbone(deit.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for predictor in dyvit.score_predictor:
            last = predictor.out_conv[-2]  # Linear(C/4 -> 2), before the LogSoftmax
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 4 / last.weight.shape[1] ** 0.5)
    return deit, dyvit


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    from fastvit_kernels.modules import MaskedTokenAttention

    for m in model.modules():
        if isinstance(m, MaskedTokenAttention):
            m.fused = fused


def keep_ratio_loss(decisions: Sequence[torch.Tensor], ratios: Sequence[float]) -> torch.Tensor:
    """DynamicViT's ratio loss: the mean kept fraction of each stage pulled to its target."""
    loss = 0.0
    for decision, ratio in zip(decisions, ratios):
        loss = loss + ((decision.mean(dim=1) - ratio) ** 2).mean()
    return loss / len(decisions)


def mean_last_stage_tokens(dyvit, images: torch.Tensor, threshold: float) -> float:
    dyvit.eval().set_keep_mode("threshold", threshold)
    with torch.inference_mode():
        _, cu = dyvit.forward_features(images)
    return float((cu[1:] - cu[:-1]).float().mean())


def calibrate_threshold(dyvit, images: torch.Tensor, target: float, steps: int = 12) -> float:
    """The keep-probability threshold at which `images` keep `target` tokens on average after the
    last stage (bisection; the count falls as the threshold rises)."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if mean_last_stage_tokens(dyvit, images, mid) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _infer_callable(impl: str, deit, dyvit, images, threshold: float = 0.5):
    if impl.startswith("deit_s"):
        model = deit.eval()
        if impl.endswith(".compile"):
            model = torch.compile(model, dynamic=False)
    else:
        model = dyvit.eval()
        set_fused(dyvit, True)
        dyvit.set_keep_mode("threshold" if impl == "dyvit.threshold" else "topk", threshold)

    def run():
        with torch.inference_mode():
            return model(images)

    return run


def _train_callable(impl: str, deit, dyvit, images, labels):
    if impl == "deit_s":
        deit.train()

        def run():
            deit.zero_grad(set_to_none=True)
            F.cross_entropy(deit(images), labels).backward()

        return run
    dyvit.train()
    set_fused(dyvit, impl == "dyvit.fused")
    ratios = list(dyvit.token_ratio)
    generator = torch.Generator(device=images.device)

    def run():
        generator.manual_seed(0)  # the same Gumbel noise for every variant and call
        dyvit.zero_grad(set_to_none=True)
        logits, decisions = dyvit(images, gumbel_noise=generator)
        (F.cross_entropy(logits, labels) + 2.0 * keep_ratio_loss(decisions, ratios)).backward()

    return run


def run(*, batches: Sequence[int], dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
        passes: Sequence[str] = PASSES, infer_impls: Sequence[str] = INFER_IMPLS,
        train_impls: Sequence[str] = TRAIN_IMPLS, train_batch: int = 64) -> List[Dict]:
    deit, dyvit = build_models(device, dtype)
    common.log(f"DynamicViT-S tokens per stage (topk): {dyvit.token_counts()}")
    rows = []
    g = torch.Generator().manual_seed(1)
    threshold = 0.5
    if "dyvit.threshold" in infer_impls and "infer" in passes:
        calibration = torch.randn(8, 3, 224, 224, generator=g).to(device, dtype)
        threshold = calibrate_threshold(dyvit, calibration, target=dyvit.token_counts()[-1])
        common.log(f"threshold {threshold:.4f} keeps {dyvit.token_counts()[-1]} tokens per image on average")
    for pass_ in passes:
        pass_batches = list(batches) if pass_ == "infer" else [train_batch]
        impls = infer_impls if pass_ == "infer" else train_impls
        for batch in pass_batches:
            images = torch.randn(batch, 3, 224, 224, generator=g).to(device, dtype)
            labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
            for impl in impls:
                row = common.make_row(env, case=f"B{batch}", B=batch, dtype=common.dtype_name(dtype),
                                      **{"pass": pass_}, impl=impl)
                common.log(f"{pass_} B={batch} {impl} ...")

                def prepare():
                    if pass_ == "infer":
                        return _infer_callable(impl, deit, dyvit, images, threshold)
                    return _train_callable(impl, deit, dyvit, images, labels)

                def check(out):
                    if impl == "dyvit.threshold":
                        row["threshold"] = threshold
                        row["mean_tokens_last_stage"] = round(mean_last_stage_tokens(dyvit, images, threshold), 1)

                rows.append(common.measure_model(row, prepare, device, images=batch, quick=quick,
                                                 min_run_time=0.5 if quick else 3.0, check=check))
    _add_deit_ratios(rows)
    return rows


def _add_deit_ratios(rows: List[Dict]) -> None:
    base = {(r["pass"], r["B"]): r["img_per_s"] for r in rows if r["impl"] == "deit_s" and r.get("img_per_s")}
    for r in rows:
        ref = base.get((r["pass"], r["B"]))
        r["vs_deit"] = r["img_per_s"] / ref if ref and r.get("img_per_s") else None


COLUMNS = [
    common.Column("pass", "pass", left=True),
    common.Column("B", "batch"),
    common.Column("impl", "impl", left=True),
    common.Column("ms", "ms", "{:.2f}"),
    common.Column("img_per_s", "img/s", "{:.1f}"),
    common.Column("vs_deit", "x deit_s", "{:.2f}"),
    common.Column("note", "note", left=True),
]


def table(rows: List[Dict]) -> str:
    return common.noted_table(rows, COLUMNS, lambda row: (
        [f"mean tokens after the last stage {row['mean_tokens_last_stage']}"]
        if row.get("mean_tokens_last_stage") is not None else []))


# ---------------------------------------------------------------------------------------------
# The attention ops (--level ops), as one table
# ---------------------------------------------------------------------------------------------


PLAIN_TOKENS = (197, 138, 97, 68)  # DynamicViT-S top-k: before pruning and after each stage


class PlainCase:
    """Dense attention of `batch` images of N tokens at DeiT-S's 6 heads x 64 (q, k, v strided
    views of one qkv buffer, as timm's Attention makes them), a case for common.bench_kernel_cases."""

    def __init__(self, batch: int, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.name, self.B, self.N, self.dtype, self.device = f"plain.N{N}", batch, N, dtype, device
        g = torch.Generator().manual_seed(seed)
        qkv = torch.randn(batch, N, 3, varlen_attention.HEADS, varlen_attention.HEAD_DIM, generator=g)
        self.q, self.k, self.v = qkv.to(device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)

    def describe(self) -> str:
        return f"{self.B} images x {self.N} tokens, H={varlen_attention.HEADS} D={varlen_attention.HEAD_DIM} " \
               f"{common.dtype_name(self.dtype)}"

    def row_fields(self) -> Dict[str, object]:
        return dict(case=self.name, op="plain_attention", B=self.B, tokens=self.B * self.N, max_len=self.N,
                    H=varlen_attention.HEADS, D=varlen_attention.HEAD_DIM, dtype=common.dtype_name(self.dtype))

    def backend(self) -> str:
        return select_backend(self.q, self.k, self.v).name

    def oracle(self, need_grads: bool, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
        q, k, v = (t.to(dtype) for t in (self.q, self.k, self.v))
        return [torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v]

    def make_callable(self, impl: str, pass_: str):
        if pass_ != "fwd":
            raise ValueError("plain attention is benchmarked forward only (inference)")
        f = bias_attention if impl == "op" else F.scaled_dot_product_attention

        def run():
            with torch.no_grad():
                return [f(self.q, self.k, self.v)]

        return run


def run_plain(*, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
              tokens: Sequence[int] = PLAIN_TOKENS) -> List[Dict]:
    cases = (PlainCase(batch, N, dtype, device) for N in tokens)
    rows = common.bench_kernel_cases(cases, ("op", "sdpa"), ("fwd",), env, quick=quick)
    common.add_ratios(rows, "op")
    return rows


def run_ops(*, batch: int, dtype: torch.dtype, device: torch.device, env: Dict, quick: bool = False,
            keeps: Sequence[float] = policy_attention.KEEP_RATIOS,
            policy_impls: Sequence[str] = policy_attention.IMPLS, passes: Sequence[str] = policy_attention.PASSES,
            varlen_passes: Sequence[str] = ("fwd",)) -> List[Dict]:
    """policy_attention rows (`passes`), then varlen_attention rows (`varlen_passes`), then the
    plain attention rows (forward)."""
    rows = policy_attention.run(batch=batch, dtype=dtype, device=device, env=env, quick=quick, keeps=keeps,
                                impls=policy_impls, passes=passes)
    rows += varlen_attention.run(batch=batch, dtype=dtype, device=device, env=env, quick=quick,
                                 passes=varlen_passes)
    return rows + run_plain(batch=batch, dtype=dtype, device=device, env=env, quick=quick)


def ops_table(rows: List[Dict]) -> str:
    return policy_attention.table(rows)  # its notes (sdpa) and the kernel table fit the varlen rows too


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_options(parser) -> None:
    parser.add_argument("--level", choices=("ops", "model", "all"), default="all")
    parser.add_argument("--model-batches", type=int, nargs="+", default=[1, 64], help="inference batches (default 1 64)")
    parser.add_argument("--train-batch", type=int, default=64, help="training-step batch (default 64)")
    parser.add_argument("--keeps", type=float, nargs="+", default=list(policy_attention.KEEP_RATIOS))
    parser.add_argument("--passes", nargs="+", choices=policy_attention.PASSES, default=list(policy_attention.PASSES),
                        help="policy_attention passes")
    parser.add_argument("--model-passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args = ctx.args
    rows = []
    if args.level in ("ops", "all"):
        impls = [i for i in policy_attention.IMPLS if not (args.no_compile and i == "compile")]
        rows += run_ops(batch=ctx.batch, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
                        keeps=args.keeps, policy_impls=impls, passes=args.passes, varlen_passes=("fwd", "fwd+bwd"))
    if args.level in ("model", "all"):
        impls = [i for i in INFER_IMPLS if not (args.no_compile and i.endswith("compile"))]
        rows += run(batches=args.model_batches, dtype=ctx.dtype, device=ctx.device, env=ctx.env, quick=ctx.quick,
                    passes=args.model_passes, infer_impls=impls, train_batch=args.train_batch)
    return rows


def report(rows: List[Dict], ctx: common.Context) -> str:
    """The ops' table and the model table (model rows are those without an `op` field)."""
    op_rows = [r for r in rows if r.get("op")]
    model_rows = [r for r in rows if not r.get("op")]
    tables = [ops_table(op_rows)] if ctx.args.level in ("ops", "all") else []
    tables += [table(model_rows)] if ctx.args.level in ("model", "all") else []
    return "\n".join(tables)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_dynamicvit", batch=(64, 256), add_options=add_options,
                       run=run_from_args, report=report,
                       batch_help="images per batch of the op benchmarks (default 64; 256 on CUDA)")


if __name__ == "__main__":
    sys.exit(main())
