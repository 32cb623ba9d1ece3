"""Smoke tests of the benchmarks (fastvit_kernels.bench): every command line parses, the shared
skeleton resolves the common options, and one tiny real run writes the JSON rows it should."""

import importlib
import json

import pytest
import torch

from fastvit_kernels.bench import common

MODULES = ("__main__", "levit", "bias_attention", "qna_attention", "qna_vit", "ggem_pool",
           "policy_attention", "varlen_attention", "dynamic_vit", "serve", "overhead", "cpu_isa", "timm_families")
COMMON_OPTIONS = ("--device", "--dtype", "--batch", "--quick", "--out")


@pytest.mark.parametrize("name", MODULES)
def test_help(name, capsys):
    """`python -m fastvit_kernels.bench.<name> --help` works and shows the common options."""
    module = importlib.import_module(f"fastvit_kernels.bench.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for option in COMMON_OPTIONS:
        assert option in out


def test_skeleton_parses_common_options(tmp_path):
    parser = common.make_parser("A benchmark.\n\nMore text.", batch=(64, 256))
    args = parser.parse_args(["--device", "cpu", "--dtype", "bfloat16", "--batch", "3", "--quick",
                              "--out", str(tmp_path / "x.json")])
    ctx = common.start(args, (64, 256))
    assert (ctx.device, ctx.dtype, ctx.batch, ctx.quick) == (torch.device("cpu"), torch.bfloat16, 3, True)
    assert args.out == tmp_path / "x.json"
    assert ctx.env["device_type"] == "cpu" and "git_sha" in ctx.env

    defaults = common.start(parser.parse_args(["--device", "cpu"]), (64, 256))
    assert (defaults.dtype, defaults.batch, defaults.quick) == (torch.float32, 64, False)


ROW_FIELDS = {"device", "device_type", "torch_threads", "torch", "git_sha", "case", "pass", "impl", "B", "dtype",
              "ms", "iqr_ms", "first_call_s", "max_rel_err", "ref_impl", "ref_speedup", "error"}


@pytest.mark.parametrize("name, argv, case", [
    ("ggem_pool", ["--shapes", "vit_s", "--no-bandwidth"], "vit_s"),
    ("bias_attention", ["--shapes", "128s.attn4", "--no-verify"], "128s.attn4"),
    ("timm_families", ["--shapes", "swin_t.s4", "--no-verify"], "swin_t.s4"),
])
def test_tiny_run_writes_rows(name, argv, case, tmp_path, capsys):
    module = importlib.import_module(f"fastvit_kernels.bench.{name}")
    out = tmp_path / "rows.json"
    assert module.main(["--device", "cpu", "--batch", "2", "--quick", "--impls", "op", "eager",
                        "--passes", "fwd", "fwd+bwd", "--out", str(out), *argv]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["schema"] == common.SCHEMA_VERSION and doc["env"]["device_type"] == "cpu"
    rows = doc["rows"]
    assert [(r["pass"], r["impl"]) for r in rows] == [("fwd", "op"), ("fwd", "eager"), ("fwd+bwd", "op"),
                                                      ("fwd+bwd", "eager")]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["case"] == case and row["B"] == 2 and row["dtype"] == "float32"
        assert row["error"] is None and row["ms"] > 0
        assert row["max_rel_err"] < common.REL_TOL[torch.float32]
        assert row["ref_impl"] == "op"
    assert all(r["backend"] for r in rows if r["impl"] == "op")


def test_serve_tiny_run_compares_outputs_and_ratios(tmp_path, capsys):
    """bench.serve on levit_128s, batch 1, float32, eager timm against the eager fvk path: both
    outputs are checked against eager float32 timm and get a ratio to the best peer."""
    pytest.importorskip("timm")
    from fastvit_kernels.bench import serve

    out = tmp_path / "serve.json"
    assert serve.main(["--device", "cpu", "--quick", "--models", "levit_128s", "--batches", "1",
                       "--dtypes", "float32", "--engines", "eager", "fvk", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"eager", "fvk"}
    for row in rows.values():
        assert row["error"] is None and row["output_ok"] and row["img_per_s"] > 0
        assert row["best_peer"] == "eager"
    assert rows["eager"]["x_best_peer"] == 1.0
    (summary,) = doc["summary"]
    assert summary["best_fvk"] == "fvk" and summary["ratio"] == rows["fvk"]["x_best_peer"]


def test_serve_checks_fused_qna_vit_against_the_plain_model(tmp_path):
    """QnA-ViT's fastvit_kernels path is checked against the published model (attention in plain
    PyTorch), not against its own fused eager output: the two differ by rounding only."""
    from fastvit_kernels.bench import serve

    out = tmp_path / "serve.json"
    assert serve.main(["--device", "cpu", "--quick", "--models", "qna_vit_tiny", "--batches", "1",
                       "--dtypes", "float32", "--engines", "eager", "fvk", "--out", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["max_rel_err"] == 0.0
    assert 0 < rows["fvk"]["max_rel_err"] < 1e-5 and rows["fvk"]["output_ok"]


def test_overhead_rows(tmp_path):
    from fastvit_kernels.bench import overhead

    rows = overhead.run(common.environment(torch.device("cpu")), quick=True)
    names = {r["case"] for r in rows}
    assert {"torch.softmax", "bias_attention", "qna_attention", "policy_attention", "varlen_attention",
            "ggem_pool"} <= names
    assert all(r["error"] is None and r["us"] > 0 for r in rows)
