"""The benchmark scripts run end to end at their smallest scale and write what their README promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import finite as _finite, load_benchmark, needs_fashion

_load = load_benchmark


@pytest.mark.slow
@needs_fashion
def test_greg_vs_l1_smoke(tmp_path: Path, keep_threads) -> None:
    gvl = _load("greg_vs_l1")
    out = tmp_path / "results"
    result = gvl.main(["--scale", "smoke", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")])

    md, js, png = (out / "greg_vs_l1_smoke.md", out / "greg_vs_l1_smoke.json", out / "greg_vs_l1_smoke_separation.png")
    for f in (md, js, png):
        assert f.is_file() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(result, default=str))  # what main returns is what it wrote

    assert data["scale"] == "smoke" and data["benchmark"] == "greg_vs_l1"
    assert {"platform", "torch", "cpu_count", "device"} <= set(data["hardware"])
    assert _finite(data["wall_time_s"]) and data["wall_time_s"] > 0
    s = data["settings"]
    assert s["model"] == "resnet20" and s["seeds"] == 2 and s["ratios"] == ["*.conv1:0.9"]
    assert _finite(data["base"]["top1"]) and data["base"]["curve"]

    # one row per ratio x seed x method, every number finite, one base, identical fine-tuning budgets
    rows = data["results"]
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, k) for m in gvl.METHODS for k in range(2))
    for r in rows:
        for key in ("top1", "best_top1", "before_ft_top1", "macs_speedup", "latency_speedup_b1", "ft_epochs"):
            assert _finite(r[key]), (r["method"], key, r[key])
        assert 0 <= r["top1"] <= 100
        assert r["macs_speedup"] == pytest.approx(rows[0]["macs_speedup"]) and r["macs_speedup"] > 5
    ft = {r["method"]: r["ft_epochs"] for r in rows if r["seed"] == 0}
    assert ft["l1"] == ft["greg1"] == ft["greg2"] == s["ft_epochs"]
    greg_iters = [r["reg_iters"] for r in rows if r["method"].startswith("greg")]
    assert all(0 < it <= 25 for it in greg_iters)  # a budget of ~20 iterations, as the smoke scale says
    extra = next(r for r in rows if r["method"] == "l1+extra" and r["seed"] == 0)
    # l1+extra gets GReg's whole planned budget, at least what either GReg run used
    assert extra["extra_iters"] == max(gvl.reg_total_iters(gvl.SCALES["smoke"], m) for m in ("greg1", "greg2"))
    assert extra["extra_iters"] >= max(greg_iters)
    assert extra["ft_epochs"] > ft["l1"]

    assert {(g["method"], g["n_seeds"]) for g in data["summary"]} == {(m, 2) for m in gvl.METHODS}
    for g in data["summary"]:
        assert all(_finite(g[k]) for k in ("top1_mean", "top1_std", "macs_speedup"))
    assert {(c["a"], c["b"]) for c in data["comparisons"]} == {
        ("greg1", "l1"), ("greg2", "l1"), ("greg1", "l1+extra"), ("greg2", "l1+extra")}
    for c in data["comparisons"]:
        assert _finite(c["delta_mean"]) and _finite(c["spread"]) and isinstance(c["exceeds_spread"], bool)

    text = md.read_text()
    assert "| method | ratios | MACs speedup |" in text and "exceeds the seed spread?" in text
    assert text.count("`*.conv1:0.9`") >= 8


def test_greg_vs_l1_gpu_plan_parses_without_a_gpu(capsys, keep_threads) -> None:
    gvl = _load("greg_vs_l1")
    res = gvl.main(["--scale", "gpu", "--dry-run"])
    printed = capsys.readouterr().out
    assert res["dry_run"] and res["settings"]["model"] == "resnet56" and res["settings"]["reg_iters"] is None
    assert "greg2 schedule" in printed and "'total': 119010" in printed  # the paper's full CIFAR schedule


def test_greg_vs_l1_uses_the_library_schedule() -> None:
    """No benchmark-side GReg levels: the pipeline gets the optimizer's lr and momentum and the library's
    budget-aware schedule fits the budget."""
    gvl = _load("greg_vs_l1")
    s = gvl.H.make_settings(gvl.BENCH, gvl.H.parse_args(gvl.BENCH, ["--scale", "cpu", "--reg-iters", "150",
                                                                  "--limit-train", "1000"]))
    for method in ("greg1", "greg2"):
        o = gvl.greg_overrides(method, s, ["layer1.0.conv1"])
        assert o["lr"] == o["lr_prune"] == s.reg_lr and o["momentum"] == s.momentum
        cfg = gvl.greg_config_of(method, s)
        assert abs(cfg.planned_iters(method)["total"] - 150) <= 15
    assert gvl.stretch_schedule("0:0.01,60:0.001,90:0.0001", 1.5) == "0:0.01,90:0.001,135:0.0001"
    assert gvl.stretch_schedule("cosine", 2.0) == "cosine"
    assert gvl._ratio_spec("0.7") == "*.conv1:0.7"
