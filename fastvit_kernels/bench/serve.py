"""Serving: whole-model images/s of fastvit_kernels' inference path against the engines a user has.

For each model, dtype (float32, bfloat16) and batch (1 and 32; 1 and 64 for DeiT-S):

  models: levit_128s, levit_256, levit_384, deit_s, qna_vit_tiny, qna_vit_tiny_7x7
  engines running the model as published (timm LeViT, dense timm DeiT-S, QnA-ViT in plain PyTorch):
    eager        PyTorch eager, inference_mode
    compile      torch.compile of it (default options)
    compile.frozen  fastvit_kernels.compile_frozen of it: torch.compile with Inductor's freezing and
                 (bf16) max-autotune GEMMs, the same compiler settings fvk.compile uses
    onnxruntime  ONNX Runtime, CPU execution provider, float32 only (its CPU kernels have no bf16)
    openvino     OpenVINO, CPU, with INFERENCE_PRECISION_HINT set to f32 or bf16 explicitly
  fastvit_kernels (fastvit_kernels.optimize_for_inference, exactly as the README recommends):
    fvk          optimize_for_inference(model, dtype)                 (eager)
    fvk.compile  optimize_for_inference(model, dtype, compile=True)   (compile_frozen of `fvk`)
    fvk.aoti     package_for_inference(`fvk`, ...): torch.export + AOTInductor package with freezing
                 and (bf16) max-autotune GEMMs, loaded with aoti_load_package
  For "deit_s" the fastvit_kernels paths run DynamicViT-S (the same backbone dropping tokens:
  197 -> 138 -> 97 -> 68, fastvit_kernels.models.dynamic_vit) — the comparison its users make.

ONNX Runtime and OpenVINO are optional (`pip install .[serve]`); absent, their rows say so. Every
engine's first output is compared with the eager float32 model (DynamicViT-S with its own eager
float32 output) before it is timed; rows above the dtype's tolerance are marked. Ratios: each
row's images/s over the best engine of the first group at the same (model, dtype, batch).

    python -m fastvit_kernels.bench.serve --quick --models levit_128s
    python -m fastvit_kernels.bench.serve --models levit_256 --dtypes bfloat16 --batches 1
"""

import contextlib
import copy
import gc
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastvit_kernels.bench import common

MODELS = ("levit_128s", "levit_256", "levit_384", "deit_s", "qna_vit_tiny", "qna_vit_tiny_7x7")
PEERS = ("eager", "compile", "compile.frozen", "onnxruntime", "openvino")
FVK = ("fvk", "fvk.compile", "fvk.aoti")
# Run order: the PyTorch engines first, then ONNX Runtime and OpenVINO, whose thread pools (ORT's
# spin after each run) would otherwise take cores from PyTorch's OpenMP threads; each engine's
# session is freed after its row.
ENGINES = ("eager", "compile", "compile.frozen") + FVK + ("onnxruntime", "openvino")
SERVE_DTYPES = ("float32", "bfloat16")
# Output tolerance against eager float32 (max relative error): bf16 runs every layer in bf16.
SERVE_TOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 3e-2}
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


# ---------------------------------------------------------------------------------------------
# Models: (published model, the model fastvit_kernels serves), both float32 eval
# ---------------------------------------------------------------------------------------------


def build_pair(name: str, seed: int = 0):
    """(peer model, fvk model) for `name`; the fvk model is a separate copy the engines may change."""
    if name.startswith("levit"):
        from fastvit_kernels.bench.levit import build_levit

        model = build_levit(name, torch.device("cpu"), seed)
        return model, copy.deepcopy(model)
    if name == "deit_s":
        from fastvit_kernels.bench.dynamic_vit import build_models

        deit, dyvit = build_models(torch.device("cpu"), torch.float32, seed)
        dyvit.set_keep_mode("topk")
        return deit.eval(), dyvit.eval()
    if name.startswith("qna_vit"):
        from fastvit_kernels.bench.qna_vit import build

        model = build(name, torch.device("cpu"), seed).eval()
        return model, copy.deepcopy(model)
    raise ValueError(f"serve: unknown model {name!r}; expected one of {MODELS}")


def peer_context(name: str):
    """What the peers run under: QnA-ViT's attention steps as plain PyTorch (the grouped-conv
    formulation, the fastest eager one), so that every engine sees the published model."""
    if name.startswith("qna_vit"):
        from fastvit_kernels.bench.qna_vit import plain_pytorch

        return plain_pytorch("conv")
    return contextlib.nullcontext()


def default_batches(name: str) -> Sequence[int]:
    return (1, 64) if name == "deit_s" else (1, 32)


# ---------------------------------------------------------------------------------------------
# Engines: each returns step() -> output for one input batch
# ---------------------------------------------------------------------------------------------


def _inference(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step():
        with torch.inference_mode():
            return fn(x)

    return step


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str) -> str:
    with torch.no_grad():
        try:
            torch.onnx.export(model, (x,), path, dynamo=True, optimize=True)
        except Exception:  # the TorchScript exporter handles some models the dynamo one rejects
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    return path


def onnxruntime_step(model, x, dtype, workdir) -> Callable[[], torch.Tensor]:
    import onnxruntime as ort

    if dtype != torch.float32:
        raise RuntimeError("ONNX Runtime's CPU execution provider has no bfloat16 kernels; float32 only")
    path = _export_onnx(model, x, os.path.join(workdir, "model.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def openvino_step(model, x, dtype, workdir) -> Callable[[], torch.Tensor]:
    import openvino as ov

    precision = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
    if precision is None:
        raise RuntimeError(f"openvino: no precision hint for {dtype}")
    path = os.path.join(workdir, "model.onnx")
    if not os.path.exists(path):  # shared with onnxruntime's export of the same model
        _export_onnx(model, x, path)
    compiled = ov.Core().compile_model(path, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    data = x.float().numpy()  # OpenVINO takes f32 input and converts inside at bf16 precision
    return lambda: torch.from_numpy(request.infer({0: data})[0].copy())


def make_step(engine: str, peer, fvk_model, x: torch.Tensor, dtype: torch.dtype, workdir: str):
    from fastvit_kernels.inference import (compile_frozen, default_autotune, optimize_for_inference,
                                           package_for_inference)

    if engine == "eager":
        return _inference(copy.deepcopy(peer).to(dtype), x.to(dtype))
    if engine == "compile":
        return _inference(torch.compile(copy.deepcopy(peer).to(dtype)), x.to(dtype))
    if engine == "compile.frozen":
        frozen = compile_frozen(copy.deepcopy(peer).to(dtype), autotune=default_autotune(dtype))
        return _inference(frozen, x.to(dtype))
    if engine == "onnxruntime":
        return onnxruntime_step(peer, x, dtype, workdir)
    if engine == "openvino":
        return openvino_step(peer, x, dtype, workdir)
    if engine == "fvk":
        return _inference(optimize_for_inference(copy.deepcopy(fvk_model), dtype), x.to(dtype))
    if engine == "fvk.compile":
        return _inference(optimize_for_inference(copy.deepcopy(fvk_model), dtype, compile=True), x.to(dtype))
    if engine == "fvk.aoti":
        model = optimize_for_inference(copy.deepcopy(fvk_model), dtype)
        xd = x.to(dtype)
        package = package_for_inference(model, (xd,), os.path.join(workdir, f"fvk_{common.dtype_name(dtype)}.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        return _inference(runner, xd)
    raise ValueError(f"serve: unknown engine {engine!r}; expected one of {ENGINES}")


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def run(models: Sequence[str], *, dtypes: Sequence[torch.dtype], batches: Optional[Sequence[int]],
        engines: Sequence[str], env: Dict, quick: bool) -> List[Dict]:
    rows: List[Dict] = []
    cpu = torch.device("cpu")
    for name in models:
        peer, fvk_model = build_pair(name)
        for batch in batches or default_batches(name):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                with peer_context(name):
                    want_peer = peer(x)
                # DynamicViT-S is a different model from DeiT-S: its own eager output is its oracle.
                want = {"peer": want_peer, "fvk": fvk_model(x) if name == "deit_s" else want_peer}
            for dtype in dtypes:
                group: List[Dict] = []
                with tempfile.TemporaryDirectory(prefix="fvk_serve_") as workdir:
                    for engine in engines:
                        row = common.make_row(env, case=name, impl=engine, B=batch, dtype=common.dtype_name(dtype),
                                              model="dynamicvit_s" if name == "deit_s" and engine in FVK else name)
                        common.log(f"{name} B={batch} {common.dtype_name(dtype)} {engine} ...")
                        oracle = want["fvk" if engine in FVK else "peer"]

                        def check(out, row=row, oracle=oracle, dtype=dtype):
                            err = common.rel_err(out.float(), oracle)
                            row["max_rel_err"] = err
                            row["output_ok"] = err < SERVE_TOL[dtype]

                        def prepare(engine=engine, dtype=dtype, workdir=workdir):
                            if engine in FVK:
                                return make_step(engine, peer, fvk_model, x, dtype, workdir)
                            with peer_context(name):  # export and compile see the plain model
                                step = make_step(engine, peer, fvk_model, x, dtype, workdir)

                            def peer_step():
                                with peer_context(name):
                                    return step()

                            return peer_step

                        group.append(common.measure_model(
                            row, prepare, cpu,
                            images=batch, quick=quick, min_run_time=1.0 if quick else 3.0, check=check))
                        gc.collect()
                add_peer_ratios(group)
                rows += group
    return rows


def add_peer_ratios(group: List[Dict]) -> None:
    """row['x_best_peer'] = images/s / the best images/s of the PEERS rows (same model, dtype,
    batch) whose output matched; row['best_peer'] names that engine."""
    peers = [r for r in group if r["impl"] in PEERS and r.get("img_per_s") and r.get("output_ok")]
    best = max(peers, key=lambda r: r["img_per_s"], default=None)
    for row in group:
        row["best_peer"] = best["impl"] if best else None
        row["x_best_peer"] = row["img_per_s"] / best["img_per_s"] if best and row.get("img_per_s") else None


# (model, dtype, batch): the key of both tables.
KEY_COLUMNS = [common.Column("case", "model", left=True), common.Column("dtype", "dtype", left=True),
               common.Column("B", "batch")]
COLUMNS = KEY_COLUMNS + [
    common.Column("impl", "engine", left=True),
    common.Column("img_per_s", "img/s", "{:.1f}"),
    common.Column("x_best_peer", "x best peer", "{:.2f}"),
    common.Column("max_rel_err", "rel err", "{:.1e}"),
    common.Column("first_call_s", "1st s", "{:.1f}"),
    common.Column("note", "note", left=True),
]


def table(rows: List[Dict], ctx: Optional[common.Context] = None) -> str:
    def notes(row):
        out = []
        if row.get("model") != row.get("case"):
            out.append(f"runs {row['model']}")
        if row.get("output_ok") is False:
            out.append("OUTPUT MISMATCH")
        return out

    return common.noted_table(rows, COLUMNS, notes)


def summary(rows: List[Dict]) -> List[Dict]:
    """One row per (model, dtype, batch): the best peer and the best fastvit_kernels path."""
    out = []
    keys = sorted({(r["case"], r["dtype"], r["B"]) for r in rows}, key=lambda k: (MODELS.index(k[0])
                                                                                  if k[0] in MODELS else 99, k[1], k[2]))
    for key in keys:
        group = [r for r in rows if (r["case"], r["dtype"], r["B"]) == key and r.get("img_per_s") and r.get("output_ok")]
        peer = max((r for r in group if r["impl"] in PEERS), key=lambda r: r["img_per_s"], default=None)
        fvk = max((r for r in group if r["impl"] in FVK), key=lambda r: r["img_per_s"], default=None)
        out.append({"case": key[0], "dtype": key[1], "B": key[2],
                    "best_peer": peer and peer["impl"], "peer_img_per_s": peer and peer["img_per_s"],
                    "best_fvk": fvk and fvk["impl"], "fvk_img_per_s": fvk and fvk["img_per_s"],
                    "ratio": fvk["img_per_s"] / peer["img_per_s"] if peer and fvk else None})
    return out


SUMMARY_COLUMNS = KEY_COLUMNS + [
    common.Column("best_peer", "best peer", left=True),
    common.Column("peer_img_per_s", "img/s", "{:.1f}"),
    common.Column("best_fvk", "best fastvit_kernels", left=True),
    common.Column("fvk_img_per_s", "img/s", "{:.1f}"),
    common.Column("ratio", "ratio", "{:.2f}"),
]


def report(rows: List[Dict], ctx: common.Context) -> str:
    ctx.json_extra["summary"] = summary(rows)
    return table(rows) + "\n\n" + common.format_table(ctx.json_extra["summary"], SUMMARY_COLUMNS)


def add_options(parser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=SERVE_DTYPES, default=list(SERVE_DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 and 32 (1 and 64 for deit_s)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))


def run_ctx(ctx: common.Context) -> List[Dict]:
    if ctx.device.type != "cpu":
        raise SystemExit("bench.serve measures CPU serving; --device cpu")
    args = ctx.args
    return run(args.models, dtypes=[common.DTYPES[d] for d in args.dtypes], batches=args.batches,
               engines=args.engines, env=ctx.env, quick=ctx.quick)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="serve", run=run_ctx, report=report, add_options=add_options,
                       dtype_help="ignored: see --dtypes")


if __name__ == "__main__":
    sys.exit(main())
