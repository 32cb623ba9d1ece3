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
