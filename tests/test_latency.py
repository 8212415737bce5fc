"""Latency: the claim/unstable decision on synthetic timings, and the measurement's plumbing (never its speed)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import regprune
import regprune.report as R
from regprune.errors import UserError
from regprune.report import LatencyComparison, LatencyStats, compare_latency, latency_lines, latency_verdict

FAST = [5.0, 5.1, 4.9, 5.2, 5.0, 4.8, 5.1]
SLOW = [10.0, 10.3, 9.8, 10.1, 10.2, 9.9, 10.0]


# ---------------------------------------------------------------------------------------------- the decision
def test_stats_median_and_iqr():
    s = LatencyStats.of([9, 1, 5, 3, 7, 2, 8, 4, 6])
    assert (s.median_ms, s.q1_ms, s.q3_ms, s.iqr_ms) == (5, 3, 7, 4)
    assert s.text(1) == "5.0 ± 4.0"
    assert s.to_dict()["rounds"] == 9


def test_claim_when_iqrs_apart_and_machine_idle():
    v = latency_verdict(SLOW, FAST, load=0.5, cpus=4)
    assert v.stable and v.reason == ""
    assert v.speedup == pytest.approx(10.0 / 5.0)
    assert v.text() == "2.00x"


def test_slower_candidate_is_a_claim_too():
    v = latency_verdict(FAST, SLOW, load=0.5, cpus=4)
    assert v.stable and v.speedup == pytest.approx(0.5) and v.text() == "0.50x"


def test_overlapping_iqrs_are_unstable():
    a = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    b = [7.5, 8.5, 9.5, 10.5, 11.5, 12.5]
    v = latency_verdict(a, b, load=0.1, cpus=4)
    assert not v.stable
    assert v.text().startswith("unstable (interquartile ranges overlap")
    assert v.speedup == pytest.approx(7.5 / 10.0)  # the ratio of medians is still reported


def test_busy_machine_is_unstable_even_with_clear_timings():
    v = latency_verdict(SLOW, FAST, load=9.0, cpus=4)
    assert not v.stable and v.text() == "unstable (machine busy: load 9.0 on 4 CPUs)"
    assert latency_verdict(SLOW, FAST, load=4.0, cpus=4).stable  # exactly one runnable thread per CPU is fine
    assert latency_verdict(SLOW, FAST, load=None, cpus=None).stable  # unknown load (no getloadavg) is not judged


def test_every_reason_is_given():
    v = latency_verdict([5.0, 6.0, 7.0], [5.5, 6.5, 7.5], load=100.0, cpus=2)
    assert not v.stable
    assert "only 3 rounds" in v.reason and "machine busy" in v.reason and "overlap" in v.reason


@pytest.mark.parametrize("bad", [[], [1.0, -2.0], [1.0, float("nan")], [0.0, 1.0], [float("inf")]])
def test_bad_timings_are_refused(bad):
    with pytest.raises(ValueError):
        latency_verdict(bad, FAST)


def test_comparison_keeps_the_old_mapping_of_medians():
    c = LatencyComparison({"dense": LatencyStats.of(SLOW), "pruned": LatencyStats.of(FAST)}, "dense", 0.2, 8)
    assert dict(c) == {"dense": 10.0, "pruned": 5.0}  # c["dense"] is the median ms, as compare_latency gave before
    assert c.verdict().text() == "2.00x" and list(c.verdicts) == ["pruned"]
    d = json.loads(json.dumps(c.to_dict()))
    assert d["models"]["pruned"]["median_ms"] == 5.0 and d["verdicts"]["pruned"]["stable"] is True
    line = latency_lines({"PyTorch CPU batch 1": c, "ONNX Runtime": None})
    assert line.startswith("latency pruned vs dense, PyTorch CPU batch 1: 2.00x (5.000 ± ")
    assert "ONNX" not in line and "\n" not in line


# ---------------------------------------------------------------------------------------------- the measurement
class Recorder(nn.Module):
    """Records each forward's name and torch's thread count at the time."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.log.append((self.name, torch.get_num_threads(), torch.is_grad_enabled()))
        return self.lin(x)


def _runs(log):
    """Consecutive runs of the same name, collapsed: the order the models were measured in."""
    out = []
    for name, *_ in log:
        if not out or out[-1] != name:
            out.append(name)
    return out


def test_rounds_interleave_and_alternate(keep_threads, monkeypatch):
    monkeypatch.setattr(R, "system_load", lambda: (1000.0, 2))
    torch.set_num_threads(2)
    log: list = []
    c = compare_latency({"dense": Recorder("dense", log), "pruned": Recorder("pruned", log)}, torch.randn(2, 4),
                        repeats=4, warmup=0, min_run_time=1e-4)
    assert _runs(log) == ["dense", "pruned", "dense", "pruned", "dense"]  # d p | p d | d p | p d
    assert {t for _, t, _ in log} == {2}  # timed at torch's own thread count, not the Timer's default of 1
    assert not any(g for *_, g in log)  # no autograd
    for k in ("dense", "pruned"):
        s = c.stats[k]
        assert len(s.samples_ms) == 4 and all(v > 0 for v in s.samples_ms)
        assert s.q1_ms <= s.median_ms <= s.q3_ms and c[k] == s.median_ms
    v = c.verdict()
    assert v.speedup == pytest.approx(c["dense"] / c["pruned"])
    assert not v.stable and "machine busy: load 1000.0 on 2 CPUs" in v.reason  # the load read is used


def test_system_load_without_getloadavg(monkeypatch):
    monkeypatch.delattr(R.os, "getloadavg", raising=False)
    load, cpus = R.system_load()
    assert load is None and cpus == R.os.cpu_count()


def test_onnxruntime_latency_measures_both():
    pytest.importorskip("onnxruntime")
    models = {"dense": nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "pruned": nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())}
    c = R.onnxruntime_latency(models, torch.randn(1, 3, 8, 8), repeats=3, warmup=0, min_run_time=1e-4)
    assert set(c.stats) == {"dense", "pruned"} and all(len(s.samples_ms) == 3 for s in c.stats.values())
    assert "only 3 rounds" in c.verdict().reason


def test_onnxruntime_latency_notes_instead_of_failing(monkeypatch):
    class NotTensors(nn.Module):
        def forward(self, x):
            return "text"

    c, note = R.try_onnxruntime_latency({"dense": NotTensors(), "pruned": NotTensors()}, torch.randn(1, 3, 8, 8))
    assert c is None and note.startswith("ONNX Runtime latency skipped: ") and "\n" not in note
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    c, note = R.try_onnxruntime_latency({"dense": nn.Identity()}, torch.randn(1, 3, 8, 8))
    assert c is None and "pip install 'regprune[export]'" in note


# ---------------------------------------------------------------------------------------------- the reports
@pytest.fixture(scope="module")
def dense_pruned():
    from regprune.models import create_model

    torch.manual_seed(0)
    dense = create_model("resnet20", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 8, 8)
    return dense, regprune.prune(dense, x, ratios="*.conv1:0.5").model, x


def _report(tmp_path, dense_pruned):
    """The prune pipeline's report step on a real dense/pruned pair, without training."""
    from regprune.jobs.report import prune_report
    from regprune.pipeline import JobOptions, RunDir

    dense, pruned, x = dense_pruned
    o = JobOptions.from_dict({"method": "l1", "model": "resnet20", "out": str(tmp_path / "run")})
    return prune_report(o, RunDir(o.run.out), dense, pruned, x, SimpleNamespace(name="synthetic"), [], None)


def _fake_measure(load):
    """A stand-in for measure_interleaved: the first model takes ~10 ms, the others ~5 ms (no clock read)."""

    def measure(fns, rounds=15, warmup=3, min_run_time=0.005, baseline=None, num_threads=None):
        names = list(fns)
        return LatencyComparison({k: LatencyStats.of(SLOW if k == names[0] else FAST) for k in names}, names[0],
                                 load, 4)

    return measure


def test_prune_report_claims_only_stable_speedups(tmp_path, monkeypatch, dense_pruned):
    monkeypatch.setattr(R, "measure_interleaved", _fake_measure(0.1))
    out = _report(tmp_path, dense_pruned)
    table, rep = out["table"], out["report"]
    slow, fast = LatencyStats.of(SLOW), LatencyStats.of(FAST)
    assert slow.text(3) in table and fast.text(3) in table and " ± " in slow.text(3)  # median ± IQR cells
    assert "ort_ms_b1" in table  # onnxruntime is installed in the test environment
    for label in ("PyTorch CPU batch 1", "PyTorch CPU batch 64", "ONNX Runtime CPU batch 1"):
        assert f"latency pruned vs dense, {label}: 2.00x" in table
    assert rep["latency_speedup_b1"] == 2.0 and rep["latency_speedup_b64"] == 2.0
    assert rep["latency_verdict_b1"] == "2.00x" and rep["latency"]["onnxruntime_b1"]["verdicts"]["pruned"]["stable"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    dense_row = saved["rows"][0]
    assert dense_row["cpu_ms_b1"] == 10.0 and dense_row["ort_ms_b1"] == 10.0
    assert dense_row["cpu_ms_b1_iqr"] == round(slow.iqr_ms, 3) and saved["rows"][1]["cpu_ms_b64_iqr"] == round(fast.iqr_ms, 2)
    assert isinstance(saved["latency_speedup_b1"], float)


def test_prune_report_says_unstable_on_a_busy_machine(tmp_path, monkeypatch, dense_pruned):
    monkeypatch.setattr(R, "measure_interleaved", _fake_measure(1000.0))

    def no_ort(*a, **kw):
        raise UserError("ONNX export failed: nope")

    monkeypatch.setattr(R, "onnxruntime_latency", no_ort)
    out = _report(tmp_path, dense_pruned)
    table, rep = out["table"], out["report"]
    assert "latency pruned vs dense, PyTorch CPU batch 1: unstable (machine busy: load 1000.0 on 4 CPUs)" in table
    assert "2.00x" not in table and "cpu_ms_b1" in table  # no claim, but the numbers stay
    assert "ONNX Runtime latency skipped: ONNX export failed: nope" in table and "ort_ms_b1" not in table
    assert rep["latency_verdict_b64"].startswith("unstable (")
    assert rep["latency_speedup_b1"] == 2.0  # the ratio of medians stays in the JSON, as a float
    assert rep["latency"]["onnxruntime_b1"] is None and rep["latency"]["onnxruntime_note"].startswith("ONNX Runtime")


def test_pyplot_is_public_and_headless():
    pytest.importorskip("matplotlib")
    assert callable(R.pyplot)
    assert R.pyplot().get_backend().lower() == "agg"
