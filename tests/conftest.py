"""Test-wide settings. They must be in place before torch/triton import our kernels."""

import os

# Kernels fill the outputs they allocate with NaN first: an element never written cannot pass.
os.environ.setdefault("FASTVIT_KERNELS_POISON", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so CI tests them.
# (Read when a @triton.jit function is defined, so it must be set before any kernel module loads.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Long exhaustive checks (the full Triton compile sweep) are marked `sweep` and skipped unless
# asked for with `-m sweep` or `--sweep`.
def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true", default=False,
                     help="also run the tests marked sweep (long exhaustive checks)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "sweep: long exhaustive check, skipped unless -m sweep or --sweep is given")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--sweep") or "sweep" in (config.getoption("markexpr") or ""):
        return
    import pytest

    skip = pytest.mark.skip(reason="long sweep: run with -m sweep or --sweep")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)


# Tests add (title, lines) to config._fastvit_summaries to have them printed at the end of the
# run (the Triton compile check's register and spill summary).
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, lines in getattr(config, "_fastvit_summaries", []):
        terminalreporter.write_sep("-", title)
        for line in lines:
            terminalreporter.write_line(line)
