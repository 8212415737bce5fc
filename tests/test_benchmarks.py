"""Every benchmark script answers --help when run as a script, and the trainer-overhead benchmark runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BENCH, finite, load_benchmark

SCRIPTS = ("cost.py", "engine_overhead.py", "peers.py", "speedup.py", "spm_ablation.py", "zoo.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:") and f"benchmarks/{script}" in proc.stdout


def test_engine_overhead_writes_its_report(tmp_path: Path, keep_threads) -> None:
    bench = load_benchmark("engine_overhead")
    out = tmp_path / "eo.json"
    rep = bench.main(["--steps", "2", "--repeats", "2", "--warmup", "1", "--batch-size", "8", "--num-batches", "2",
                      "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == rep
    assert len(rep["trainer_ms_per_step"]) == len(rep["bare_ms_per_step"]) == 2
    assert all(finite(rep[k]) and rep[k] > 0 for k in ("trainer_ms_per_step_median", "bare_ms_per_step_median", "ratio"))
    assert rep["overhead_pct"] == pytest.approx((rep["ratio"] - 1) * 100)
