"""bench/gpu_check.py refuses, in one line and with a non-zero exit, where there is no CUDA GPU."""

from __future__ import annotations

import importlib.util

import torch
from typer.testing import CliRunner

from tests.conftest import REPO


def test_gpu_check_refuses_without_cuda_in_one_line(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    out = tmp_path / "gpu_check.json"
    res = CliRunner().invoke(gpu_check.app, ["--data", "sample", "--out", str(out)])
    assert res.exit_code == 1 and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0], res.output
    assert not out.exists() and not (tmp_path / "gpu_runs").exists(), "nothing ran"
