"""`python -m fastvit_kernels.bench`: does fastvit_kernels work here, and how fast is it?

On the device present (cuda if available, else cpu; `--device` to choose):
  1. the environment: hardware, versions, which bias_attention backend runs;
  2. timm levit_128s against a patched copy: outputs (eval) and gradients (train) must match;
  3. end-to-end images/s: eager timm, patched, patched + folded BatchNorm, torch.compile of timm
     (fastvit_kernels/bench/levit.py);
  3b. serving the same model on CPU, batch 1 and 32, float32 and bfloat16: eager timm,
     torch.compile, ONNX Runtime and OpenVINO (when installed: pip install .[serve]) against
     fastvit_kernels.optimize_for_inference, eager and compiled (bench/serve.py);
  4. the bias_attention microbenchmarks (fastvit_kernels/bench/bias_attention.py);
  5. the qna_attention microbenchmark at the QnA-ViT tiny stage-0 shape (k=3) and QnA-ViT tiny
     inference images/s against plain PyTorch (bench/qna_attention.py, bench/qna_vit.py);
  6. DynamicViT: policy_attention fwd+bwd at keep 0.7 / 0.343 against DynamicViT's eager formula
     and SDPA, varlen_attention against padded SDPA, and DynamicViT-S against DeiT-S images/s at
     batch 1 and 64 (bench/policy_attention.py, bench/varlen_attention.py, bench/dynamic_vit.py);
  7. the performance targets (benchmarks/README.md) met or not, and the JSON file.

    python -m fastvit_kernels.bench --quick          # a few minutes on a 2-core CPU
    python -m fastvit_kernels.bench --out results.json

Works without the native extension: then the plain-PyTorch reference runs, and it says so.
Each stage's module also runs alone: `python -m fastvit_kernels.bench.<module> --help`.
"""

import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from fastvit_kernels.bench import common

BATCH = (32, 256)  # end-to-end batch on CPU, on CUDA

# Performance targets (benchmarks/README.md): (description, section, case, pass, batch, peer,
# minimum op speed-up = peer time / reference time). Defined for CPU float32 at these batches.
# Section "qna" reads the QnA summary (fastvit_kernels.bench.qna_attention.summarize): the peer
# is a summary column, and a negative minimum means "at most" (memory ratios).
TARGETS = (
    ("bias_attention fwd, 128s.attn14 B=64: op >= 5x eager", "kernel", "128s.attn14", "fwd", 64, "eager", 5.0),
    ("bias_attention fwd, 128s.attn14 B=64: op >= 2.5x compiled FlexAttention", "kernel", "128s.attn14", "fwd", 64, "flex", 2.5),
    ("bias_attention fwd+bwd, 128s.attn14 B=64: op >= 3x SDPA", "kernel", "128s.attn14", "fwd+bwd", 64, "sdpa", 3.0),
    ("levit_128s inference batch 32: patched+folded >= 1.2x torch.compile(timm)", "levit", "levit_128s", "infer", 32, "compile", 1.2),
    # QnA (issue 3), at the QnA-ViT tiny stage-0 layer (56x56, h=8, d=8, k=3), batch 32; peers are
    # the fastest plain-PyTorch formulation (unfold or grouped conv) and the fastest compiled one.
    ("qna_attention fwd, s0.qna.k3 B=32: op >= 3x the fastest PyTorch formulation", "qna", "s0.qna.k3", "fwd", 32, "vs_eager", 3.0),
    ("qna_attention fwd, s0.qna.k3 B=32: op >= 1.5x its torch.compile", "qna", "s0.qna.k3", "fwd", 32, "vs_compiled", 1.5),
    ("qna_attention fwd+bwd, s0.qna.k3 B=32: op >= 2x the fastest PyTorch formulation", "qna", "s0.qna.k3", "fwd+bwd", 32, "vs_eager", 2.0),
    ("qna_attention fwd+bwd, s0.qna.k3 B=32: peak memory <= 0.5x unfold's", "qna", "s0.qna.k3", "fwd+bwd", 32, "mem_vs_unfold", -0.5),
    # DynamicViT (issue 4), DeiT-S shapes (N=197, H=6, D=64). Section "dyvit" reads the attention
    # rows (peer's time / op's time); "dyvit_keep" the op's time at keep 0.7 / its time at the
    # case's keep; "dyvit_model" DynamicViT-S images/s / DeiT-S images/s.
    ("policy_attention fwd+bwd, keep 0.7 B=64: op >= 3x DynamicViT's eager formula", "dyvit", "policy.keep0.7", "fwd+bwd", 64, "eager", 3.0),
    ("policy_attention fwd+bwd, keep 0.343 B=64: faster than at keep 0.7", "dyvit_keep", "policy.keep0.343", "fwd+bwd", 64, "op", 1.0),
    ("DynamicViT-S inference batch 64: >= 1.3x DeiT-S images/s", "dyvit_model", "B64", "infer", 64, "dyvit.topk", 1.3),
    ("DynamicViT-S inference batch 1: not slower than DeiT-S", "dyvit_model", "B1", "infer", 1, "dyvit.topk", 1.0),
    # Serving (issue 12), section "serve" reads bench.serve's summary: the best fastvit_kernels
    # path's images/s / the best peer engine's, case = dtype, at the batch.
    ("levit serving fp32 batch 1: best fvk path >= 1.3x the best engine", "serve", "float32", "infer", 1, "ratio", 1.3),
    ("levit serving fp32 batch 32: best fvk path >= 1.3x the best engine", "serve", "float32", "infer", 32, "ratio", 1.3),
    ("levit serving bf16 batch 1: best fvk path >= 1.3x the best engine", "serve", "bfloat16", "infer", 1, "ratio", 1.3),
    ("levit serving bf16 batch 32: best fvk path >= 1.3x the best engine", "serve", "bfloat16", "infer", 32, "ratio", 1.3),
)


class Stages:
    """Prints each stage with the elapsed time (stderr), so a slow step is visible as it runs."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def next(self, title: str) -> None:
        self.n += 1
        common.log(f"=== stage {self.n}/{self.total}: {title} (elapsed {time.perf_counter() - self.t0:.0f} s)")


def _find(rows: List[Dict], case: str, pass_: str, impl: str) -> Optional[Dict]:
    return next((r for r in rows if (r.get("case"), r.get("pass"), r.get("impl")) == (case, pass_, impl)), None)


def check_targets(levit_rows: List[Dict], kernel_rows: List[Dict], qna_summary: List[Dict], env: Dict,
                  dyvit_rows: Sequence[Dict] = (), dyvit_model_rows: Sequence[Dict] = (),
                  serve_summary: Sequence[Dict] = ()) -> List[Dict]:
    results = []
    for text, section, case, pass_, batch, peer, bound in TARGETS:
        if section == "qna":
            row = next((r for r in qna_summary if (r["level"], r["case"], r["pass"]) == ("op", case, pass_)), None)
            measured = row.get(peer) if row else None
        elif section == "dyvit":
            row = _find(list(dyvit_rows), case, pass_, peer)
            measured = row.get("ref_speedup") if row else None
        elif section == "dyvit_keep":
            row, at_07 = _find(list(dyvit_rows), case, pass_, peer), _find(list(dyvit_rows), "policy.keep0.7", pass_, peer)
            measured = at_07["ms"] / row["ms"] if row and at_07 and row.get("ms") and at_07.get("ms") else None
        elif section == "serve":
            row = next((r for r in serve_summary if (r["dtype"], r["B"]) == (case, batch)), None)
            measured = row.get(peer) if row else None
            if measured is not None:  # defined for both dtypes: skip the float32-only rule below
                verdict = "met" if measured >= bound else "NOT met"
                results.append({"target": text, "bound": bound, "measured": measured, "verdict": verdict})
                continue
        elif section == "dyvit_model":
            row = _find(list(dyvit_model_rows), case, pass_, peer)
            measured = row.get("vs_deit") if row else None
        else:
            row = next((r for r in (levit_rows if section == "levit" else kernel_rows)
                        if (r.get("case"), r.get("pass"), r.get("impl")) == (case, pass_, peer)), None)
            measured = row.get("ref_speedup") if row else None
        if measured is None:
            verdict = "not measured"
        elif env["device_type"] != "cpu" or row.get("dtype", "float32") != "float32" or row.get("B", batch) != batch:
            verdict = f"n/a (defined for CPU float32, batch {batch})"
        else:
            verdict = "met" if (measured >= bound if bound > 0 else measured <= -bound) else "NOT met"
        results.append({"target": text, "bound": bound, "measured": measured, "verdict": verdict})
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = common.make_parser(
        __doc__, prog="python -m fastvit_kernels.bench", batch=BATCH,
        batch_help="end-to-end batch (default 32 on CPU, 256 on CUDA)",
        dtype_help="timing dtype: default float32 on CPU, float16 on CUDA (checks always float32)",
        quick_help="one kernel shape, short timings (~5 min on 2 CPU cores)")
    parser.add_argument("--model", default="levit_128s", help="timm LeViT model (default levit_128s)")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile peer")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmarks")
    parser.add_argument("--no-serve", action="store_true", help="skip the serving comparison (CPU)")
    args = parser.parse_args(argv)

    from fastvit_kernels.bench import bias_attention, levit

    stages = Stages(8)
    stages.next("environment")
    ctx = common.start(args, BATCH)
    device, dtype, batch, env = ctx.device, ctx.dtype, ctx.batch, ctx.env
    print(common.describe_env(env), flush=True)
    from fastvit_kernels.ops.bias_attention import select_backend

    s = bias_attention.LEVIT_ATTENTION_SHAPES[0]
    sample = [torch.empty(1, s.heads, s.nq, d, device=device, dtype=dtype) for d in (s.key_dim, s.key_dim, s.val_dim)]
    backend = select_backend(*sample, torch.empty(s.heads, s.table_size, device=device, dtype=dtype),
                             torch.zeros(s.nq, s.nk, dtype=torch.long, device=device)).name
    env["bias_attention_backend"] = backend
    line = f"bias_attention backend on {device.type} {common.dtype_name(dtype)}: {backend}"
    if backend == "reference":
        line += f" (plain PyTorch; native extension: {env.get('native_error') or 'loaded'})"
    print(line, flush=True)

    stages.next(f"{args.model}: patched vs timm, outputs and gradients (float32)")
    base = levit.build_levit(args.model, device)
    check: Dict[str, object]
    try:
        check = levit.check_patched(base, device)
        print(check.get("patch_report", ""))
        print(f"max relative error vs timm: eval output {check['eval_rel_err']:.2e}, "
              f"folded eval output {check['folded_eval_rel_err']:.2e}, train output {check['train_rel_err']:.2e}, "
              f"gradients {check['grad_rel_err']:.2e} (worst: {check['grad_worst_param']}; attention biases "
              f"{check['attention_bias_grad_rel_err']:.2e}; "
              f"{check['grads_compared']} parameters compared) -> {'OK' if check['ok'] else 'MISMATCH'}", flush=True)
        if check["grads_missing"]:
            print(f"parameters without a matching gradient: {check['grads_missing']}")
    except Exception as error:  # patching unavailable or broken: report, still time eager peers
        check = {"ok": False, "error": common.short_error(error, limit=2000)}
        print(f"check failed: {common.short_error(error)}", flush=True)

    stages.next(f"{args.model} inference images/s (batch {batch}, {common.dtype_name(dtype)})")
    impls = ["eager", "patched", "patched+folded"] + ([] if args.no_compile else ["compile"])
    levit_rows = levit.bench_inference(base, args.model, batch=batch, dtype=dtype, device=device, env=env,
                                       quick=args.quick, impls=impls)
    print(levit.table(levit_rows), flush=True)

    stages.next(f"{args.model} serving on CPU: fastvit_kernels.optimize_for_inference vs the engines")
    serve_rows: List[Dict] = []
    serve_summary: List[Dict] = []
    if device.type == "cpu" and not args.no_serve:
        from fastvit_kernels.bench import serve

        engines = [e for e in serve.ENGINES if not (args.no_compile and "compile" in e)
                   and not (args.quick and e == "fvk.aoti")]
        serve_rows = serve.run([args.model], dtypes=(torch.float32, torch.bfloat16), batches=(1, batch),
                               engines=engines, env=env, quick=args.quick)
        serve_summary = serve.summary(serve_rows)
        print(serve.table(serve_rows), flush=True)
        print(common.format_table(serve_summary, serve.SUMMARY_COLUMNS), flush=True)

    stages.next("bias_attention microbenchmarks")
    kernel_rows: List[Dict] = []
    kbatch = 256 if device.type == "cuda" else 64
    if not args.no_kernels:
        shapes = bias_attention.select_shapes(
            ["128s.attn14"] if args.quick else bias_attention.QUICK_SHAPES + ("256.attn14",))
        kimpls = [i for i in bias_attention.IMPLS if not (args.no_compile and i in ("compile", "flex"))]
        kernel_rows = bias_attention.run(shapes, batch=kbatch, dtype=dtype, device=device, env=env,
                                         quick=args.quick, impls=kimpls)
        print(bias_attention.table(kernel_rows), flush=True)

    stages.next("QnA: qna_attention microbenchmarks and QnA-ViT tiny images/s")
    qna_rows: List[Dict] = []
    qna_summary: List[Dict] = []
    if not args.no_kernels:
        from fastvit_kernels.bench import qna_attention, qna_vit

        qimpls = [i for i in qna_attention.IMPLS if not (args.no_compile and i.startswith("compile-"))]
        qna_rows = qna_attention.run(qna_attention.select_shapes(qna_attention.QUICK_SHAPES), kernel_sizes=(3,),
                                     batch=256 if device.type == "cuda" else 32, dtype=dtype, device=device,
                                     env=env, quick=args.quick, impls=qimpls)
        qna_summary = qna_attention.summarize(qna_rows)
        print(qna_attention.table(qna_rows), flush=True)
        print(qna_attention.summary_table(qna_rows), flush=True)
        vimpls = [i for i in ("fused", "unfold", "conv", "compile-conv")
                  if not (args.no_compile and i.startswith("compile-"))]
        vit_rows = qna_vit.run("qna_vit_tiny", batch=batch, dtype=dtype, device=device, env=env,
                               quick=args.quick, impls=vimpls, passes=("infer",))
        print(qna_vit.table(vit_rows), flush=True)
        qna_rows += vit_rows

    stages.next("DynamicViT: policy_attention / varlen_attention and DynamicViT-S vs DeiT-S images/s")
    dyvit_rows: List[Dict] = []
    dyvit_model_rows: List[Dict] = []
    if not args.no_kernels:
        from fastvit_kernels.bench import dynamic_vit, policy_attention

        pimpls = [i for i in policy_attention.IMPLS if not (args.no_compile and i == "compile")]
        dyvit_rows = dynamic_vit.run_ops(batch=256 if device.type == "cuda" else 64, dtype=dtype, device=device,
                                         env=env, quick=args.quick, keeps=(0.7, 0.343), policy_impls=pimpls,
                                         passes=("fwd+bwd",))
        print(dynamic_vit.ops_table(dyvit_rows), flush=True)
        mimpls = [i for i in dynamic_vit.INFER_IMPLS if not (args.no_compile and i.endswith("compile"))]
        dyvit_model_rows = dynamic_vit.run(batches=(1, 64), dtype=dtype, device=device, env=env, quick=args.quick,
                                           passes=("infer",), infer_impls=mimpls)
        print(dynamic_vit.table(dyvit_model_rows), flush=True)

    stages.next("targets and results")
    targets = check_targets(levit_rows, kernel_rows, qna_summary, env, dyvit_rows, dyvit_model_rows, serve_summary)
    for t in targets:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        print(f"  [{t['verdict']}] {t['target']}: measured {measured}")
    common.write_results(ctx, "fastvit_bench", levit_rows + serve_rows + kernel_rows + qna_rows + dyvit_rows + dyvit_model_rows,
                         check=check, targets=targets, qna_summary=qna_summary, serve_summary=serve_summary)
    common.log(f"done in {time.perf_counter() - stages.t0:.0f} s")
    return 0 if check.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
