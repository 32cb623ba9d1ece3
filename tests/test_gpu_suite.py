"""The GPU verification suite checks itself without a GPU: `python -m fastvit_kernels.bench.gpu
--dry-run` runs its steps on CPU in Triton's interpreter at tiny sizes (about a minute), in a
subprocess as on a lent GPU, and must leave the summary, the JSON and the log."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("bias_attention", "qna_attention", "policy_attention", "varlen_attention", "ggem_pool")


def test_dry_run_writes_results_and_every_check_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVIT_KERNELS_BACKEND", "OUT")}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit_kernels.bench.gpu", "--dry-run", "--skip-build", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(p.is_file() for p in tmp_path.iterdir()), files
    (log,) = tmp_path.glob("gpu_suite_dryrun_*.log")
    (summary,) = tmp_path.glob("gpu_suite_dryrun_*_summary.txt")
    (result,) = tmp_path.glob("gpu_suite_dryrun_*.json")

    # The summary is printed last, and is the summary file.
    text = summary.read_text()
    assert proc.stdout.rstrip().endswith(text.rstrip())
    assert "DRY RUN" in text and "VERIFIED_ON_GPU" in text
    # The log holds the workers' output too.
    log_text = log.read_text()
    assert "----- check0" in log_text and "unit 0:" in log_text

    doc = json.loads(result.read_text())
    assert doc["dry_run"] is True and doc["env"]["device_type"] == "cpu"
    assert set(doc["steps"]) == {"env", "correctness", "pytest", "bench", "levit"}
    for op in OPS:
        records = [r for r in doc["correctness"] if r["op"] == op]
        assert {(r["dtype"], r["pass"]) for r in records} == {
            (d, p) for d in ("float32", "bfloat16", "float16") for p in ("fwd", "fwd+bwd")}, op
        failed = [r for r in records if not r["ok"]]
        assert not failed, failed
        # Each check ran the Triton kernels (counted), forward and, for fwd+bwd, backward.
        for r in records:
            assert r["triton_calls"]["forward"] >= 1
            assert r["pass"] == "fwd" or r["triton_calls"]["backward"] >= 1
        assert doc["ops"][op]["verified"], doc["ops"][op]["why_not"]
    assert set(doc["verified_on_gpu"]) == set(OPS)
    # On CPU the backward runs in the calling thread, so use_backend alone reaches it.
    assert doc["probes"] and all(p["use_backend_reaches_backward"] for p in doc["probes"])
    # Benchmark rows carry the forced backend (as many as the time budget allowed).
    for row in doc["bench"]:
        if row["impl"] == "op" and not row.get("error"):
            assert row["backend"] == "triton" and row["ms"] > 0


def test_summary_fits_the_device_output_with_many_failures():
    """A run where everything fails still prints a summary that fits in what the device tool
    returns, names the failures and suggests nothing."""
    from fastvit_kernels.bench import gpu

    error = "max error 1.5 > allowed 0.01 (|ref| max 3.2) " * 5
    doc = {
        "env": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "date": "2026-12-05T00:00:00+00:00"},
        "ops_selected": list(OPS), "time_budget_s": 480, "elapsed_s": 470,
        "steps": {"env": {"status": "ok", "seconds": 1.0}, "pytest": {"status": "x", "seconds": 1.0, "k": "triton-cuda"}},
        "correctness": [{"op": op, "dtype": dtype, "shape": f"shape{i}", "pass": p, "ok": False, "error": error}
                        for op in OPS for dtype in ("float32", "bfloat16", "float16") for i in range(9)
                        for p in ("fwd", "fwd+bwd")],
        "probes": [{"op": op, "use_backend_reaches_backward": False} for op in OPS],
        "pytest": [{"name": f"pytest:{op}", "files": [f"tests/test_{op}.py"], "timed_out": False, "summary": "3 failed",
                    "counts": {"failed": 3}, "per_file": {f"tests/test_{op}.py": {"failed": 3}},
                    "failures": [f"tests/test_{op}.py::test_x[triton-cuda] - {error}"] * 3} for op in OPS],
        "bench": [{"op": op, "case": f"case{c}", "dtype": "float16", "pass": p, "impl": impl, "B": 256,
                   "ms": None, "error": error, "ref_speedup": None}
                  for op in OPS for c in range(3) for p in ("fwd", "fwd+bwd") for impl in ("op", "eager", "sdpa")],
        "levit": {"check": {"model": "levit_256", "ok": False, "error": error}, "rows": []},
    }
    doc["ops"], doc["verified_on_gpu"] = gpu.verdicts(doc)
    text = gpu.summary(doc)
    assert len(text) <= gpu.SUMMARY_LIMIT
    assert doc["verified_on_gpu"] == {} and "VERIFIED_ON_GPU: Dict[str, Sequence[str]] = {}" in text
    assert "more in the JSON" in text and "alone reaches the backward: NO" in text
    for op in OPS:
        assert f"not {op}:" in text
