"""benchmarks/spm_ablation.py runs end to end at its smallest scale and writes what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import finite as _finite, load_benchmark, needs_fashion


def _load():
    return load_benchmark("spm_ablation")


@pytest.mark.slow
@needs_fashion
def test_spm_ablation_smoke(tmp_path: Path, keep_threads) -> None:
    bench = _load()
    out = tmp_path / "results"
    result = bench.main(["--scale", "smoke", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")])

    md, js, png = (out / f"spm_ablation_smoke.{ext}" for ext in ("md", "json", "png"))
    for f in (md, js, png):
        assert f.is_file() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(result, default=str))  # what main returns is what it wrote

    assert data["benchmark"] == "spm_ablation" and data["scale"] == "smoke"
    assert {"platform", "torch", "cpu_count", "device"} <= set(data["hardware"])
    assert _finite(data["wall_time_s"]) and data["wall_time_s"] > 0
    s = data["settings"]
    assert s["model"] == "resnet20" and s["seeds"] == 2 and s["target_macs"] == 0.41
    assert data["data"]["subset"] and data["data"]["train_images"] == s["limit_train"]

    # one row per variant and seed (plus the dense bases), every number finite, each at the MACs target
    rows = data["results"]
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, k) for v in (*bench.VARIANTS, "dense") for k in range(2))
    for r in rows:
        for key in ("top1", "macs_fraction", "params_M", "MMACs", "wall_s"):
            assert _finite(r[key]), (r["variant"], key, r[key])
        assert 0 <= r["top1"] <= 100
        if r["variant"] != "dense":
            assert r["macs_fraction"] == pytest.approx(s["target_macs"], abs=0.03), r
            assert r["params_M"] < r["dense_params_M"]
    for r in rows:
        if r["variant"].startswith("spm"):
            assert _finite(r["gated_top1"]) and _finite(r["search_macs_fraction"])
            assert r["reconfig_max_abs_diff"] < 1e-3  # the reconfigured model computes the gated one's function
            assert r["spm_settings"]["alpha_nuc"] == (0.0 if r["variant"] == "spm_no_nuc" else 1e-3)
            assert {"flips", "undone", "before", "after"} <= set(r["snap"])  # the library's snap ran
            assert r["cut_shares"]["search"] + r["cut_shares"]["snap"] == pytest.approx(1.0)
        if r["variant"] == "l1":
            assert _finite(r["before_ft_top1"]) and _finite(r["base_top1"]) and r["ratios"]

    # every row trains the same total epochs: scratch = base + fine-tuning epochs of L1's row
    ep = data["epochs_per_variant"]
    assert ep["l1"]["base"] == s["epochs"]
    assert ep["spm"]["total"] == ep["spm_no_nuc"]["total"] == ep["l1"]["total"] == s["epochs"] + s["ft_epochs"]

    assert [g["variant"] for g in data["summary"]] == [*bench.VARIANTS, "dense"]
    for g in data["summary"]:
        assert g["n_seeds"] == 2 and len(g["top1_values"]) == 2
        for key in ("top1_mean", "top1_std", "macs_fraction_mean", "macs_fraction_std", "params_M_mean", "epochs_total"):
            assert _finite(g[key]), (g["variant"], key)
    assert {(c["a"], c["b"]) for c in data["comparisons"]} == set(bench.COMPARISONS)
    for c in data["comparisons"]:
        assert _finite(c["delta_mean"]) and _finite(c["spread"]) and isinstance(c["exceeds_spread"], bool)
        assert len(c["paired_deltas"]) == 2

    text = md.read_text()
    assert "| variant | training epochs | MACs fraction (mean ± std) |" in text
    assert "exceeds the seed spread?" in text and "3 (2 base + 1 fine-tune)" in text
    for v in bench.VARIANTS:
        assert f"| {v}: " in text


def test_spm_ablation_gpu_plan_without_a_gpu(capsys, keep_threads) -> None:
    bench = _load()
    res = bench.main(["--scale", "gpu", "--dry-run"])
    printed = capsys.readouterr().out
    assert res["dry_run"] and res["settings"]["model"] == "resnet56" and res["settings"]["limit_train"] is None
    assert res["settings"]["device"] == "cuda" and res["settings"]["amp"] is True
    assert "alpha_nuc 0.001" in printed and "alpha_nuc 0 " in printed  # both variants' scratch plans
    assert "search (gates learning, losses on) for 65" in printed
    assert res["plan"]["l1_plan"]["macs_fraction"] == pytest.approx(0.41, abs=0.01)


def test_spm_ablation_runs_the_librarys_snap() -> None:
    """One snap implementation: the benchmark asks `regprune scratch` for its budget snap, it carries no copy."""
    bench = _load()
    assert not hasattr(bench, "snap_to_budget_terminating") and not hasattr(bench, "SNAP_WORKAROUND")
    settings = lambda argv: bench.H.make_settings(bench.BENCH, bench.H.parse_args(bench.BENCH, argv))  # noqa: E731
    s = settings(["--scale", "smoke"])
    assert bench.spm_extra(s, "spm")["exact_budget"] is True
    s = settings(["--scale", "smoke", "--no-snap"])
    assert bench.spm_extra(s, "spm_no_nuc") == {"exact_budget": False, "alpha_nuc": 0.0}
