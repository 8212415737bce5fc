"""benchmarks/speedup.py (realised vs MACs speedup per runtime) at its quick scale, and its --cuda refusal.

Runs the script as a subprocess, as a user would: it sets OMP_WAIT_POLICY before torch loads, which an
in-process import cannot do. Nothing here asserts on how fast anything ran; only that every figure exists.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import BENCH

SCRIPT = BENCH / "speedup.py"
PATHS = ("eager", "channels_last", "onnxruntime")  # the test leaves torch.compile to the benchmark
VARIANTS = ("pruned", "pruned_r8")


def _run(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "2", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=e)


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_speedup_quick_has_every_row(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    # torch.compile is left to the benchmark itself: a cold inductor cache costs minutes on 2 cores
    proc = _run(["--quick", "--networks", "resnet56", "--paths", *PATHS, "--out-dir", str(tmp_path)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "speedup_quick.json").read_text())
    md = (tmp_path / "speedup_quick.md").read_text()

    assert data["benchmark"] == "speedup" and data["settings"]["quick"] is True
    assert data["settings"]["batches"] == [1, 8] and data["settings"]["size"] == 64
    assert data["threads"]["torch"] == 2 and data["threads"]["OMP_WAIT_POLICY"]
    for when in ("before", "after"):
        assert len(data["load"][when]) == 3 and all(v >= 0 for v in data["load"][when])

    rows = data["rows"]
    want = {(n, v, b, p) for n in ("resnet56",) for v in VARIANTS for b in (1, 8) for p in PATHS}
    got = {(r["network"], r["variant"], r["batch"], r["path"]) for r in rows}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert "error" not in r, r
        for key in ("dense_ms", "pruned_ms", "dense_iqr_ms", "pruned_iqr_ms", "realised_speedup", "macs_speedup",
                    "realised_over_macs"):
            assert _pos(r[key]) or (key.endswith("iqr_ms") and r[key] == 0), (r, key)
        assert r["realised_over_macs"] == pytest.approx(r["realised_speedup"] / r["macs_speedup"])
        assert isinstance(r["stable"], bool) and (r["stable"] or r["reason"])

    nets = data["networks"]
    assert nets["resnet56"]["macs_speedup"]["pruned"] == pytest.approx(2.55, abs=0.01)
    for net in nets.values():
        assert net["conv_widths_multiple_of"]["pruned_r8"]["all"] is True
        assert all(c["passed"] for c in net["runtimes"]["onnxruntime"]["check"].values())
    for r in rows:
        assert r["macs_speedup"] == pytest.approx(nets[r["network"]]["macs_speedup"][r["variant"]])

    goal = data["goal"]
    assert goal["batch"] == 8 and len(goal["results"]) == 2 and len(goal["lines"]) == 2
    assert all(g["best_path"] in PATHS and isinstance(g["met"], bool) for g in goal["results"])
    assert "Goal: realised/MACs >= 0.9" in md and "OMP_NUM_THREADS=2" in md and "Load average" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_speedup_cuda_without_a_gpu_is_one_error_line(tmp_path: Path) -> None:
    proc = _run(["--cuda", "--out-dir", str(tmp_path)], timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0], proc.stderr
    assert not list(tmp_path.iterdir())
