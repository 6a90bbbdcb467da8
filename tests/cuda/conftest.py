"""The CUDA path's tests: a ``cuda`` marker, skipped cleanly where there is no GPU.

Every test here is marked ``cuda`` and compares the CUDA path with the CPU path (or bf16 with
fp32) on the same inputs, with the tolerance it states. Without a GPU they are collected and
skipped, naming the missing GPU. ``REPA_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead (bf16
autocast on the CPU, gloo instead of NCCL, no pinned memory): that checks the tests themselves
before a GPU is at hand (``bench/gpu_proof.sh --cpu-dry-run``) and proves nothing about CUDA.

``REPA_TEST_REPORT=FILE`` appends one JSON line per finished test to FILE as it finishes, so a
run stopped by a time limit still leaves the outcomes of the tests it finished.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ON_CPU = os.environ.get("REPA_CUDA_TESTS_ON_CPU") == "1"
HAVE_GPU = torch.cuda.is_available()
SKIP_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine (REPA_CUDA_TESTS_ON_CPU=1 runs these checks on the CPU)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_GPU or ON_CPU:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


_REPORTS = {"write": True}


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist the workers write the report lines; the controller, which sees the same
    # reports again, does not.
    controller = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    _REPORTS["write"] = not controller


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("REPA_TEST_REPORT")
    if not path or not _REPORTS["write"]:
        return
    if report.when != "call" and report.outcome == "passed":
        return  # setup and teardown that passed say nothing
    line = {
        "test": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "seconds": round(report.duration, 2),
    }
    if report.outcome != "passed":
        text = report.longreprtext or ""
        line["detail"] = text[-3000:]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


@pytest.fixture
def device() -> torch.device:
    """The GPU (the CPU under ``REPA_CUDA_TESTS_ON_CPU=1``)."""
    return torch.device("cpu") if ON_CPU and not HAVE_GPU else torch.device("cuda", 0)


@pytest.fixture
def strict_fp32():
    """fp32 matmuls and convolutions in full fp32 (no TF32) during the test: the trainer turns
    TF32 on process-wide, and a GPU-against-CPU comparison at fp32 tolerance needs it off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment of the trainer subprocesses: offline, quiet, one OpenMP thread per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("REPA_TEST_REPORT", None)
    return env

