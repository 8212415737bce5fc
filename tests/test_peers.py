"""benchmarks/peers.py runs end to end at its smoke scale and writes finite numbers for every method and target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import finite as _finite, load_benchmark, needs_fashion

_load = load_benchmark


@pytest.mark.slow
@needs_fashion
def test_peers_smoke(tmp_path: Path, keep_threads) -> None:
    peers = _load("peers")
    out = tmp_path / "results"
    result = peers.main(["--scale", "smoke", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")])

    md, js, png = out / "peers_smoke.md", out / "peers_smoke.json", out / "peers_smoke.png"
    for f in (md, js, png):
        assert f.is_file() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data == result  # what main returns is what it wrote
    assert data["benchmark"] == "peers" and data["scale"] == "smoke"

    s = data["settings"]
    rows = data["results"]
    # one job per target x seed x method, every default regprune and Torch-Pruning method present
    assert set(s["methods"]) == set(peers.DEFAULT_METHODS)
    assert sorted((r["target"], r["method"], r["seed"]) for r in rows) == sorted(
        (t, m, k) for t in s["targets"] for m in s["methods"] for k in range(s["seeds"]))
    total = s["reg_iters"] + s["ft_iters"]
    for r in rows:
        for key in ("top1", "removal_top1", "removal_recal_top1", "macs", "macs_fraction", "params", "reg_iters",
                    "ft_iters", "wall_s"):
            assert _finite(r[key]), (r["method"], key, r[key])
        assert 0 <= r["top1"] <= 100 and r["recal_batches"] == s["recal_batches"]
        # same MACs for every method: within a few percent of the target even at smoke granularity
        assert abs(r["macs_gap"]) < 0.06, (r["method"], r["target"], r["macs_fraction"])
        assert r["total_iters"] == r["reg_iters"] + r["ft_iters"] == total, r["method"]  # same total training
        if r["method"] in ("tp_bnscale", "tp_groupnorm", "tp_growingreg"):
            assert r["reg_iters"] == s["reg_iters"], r["method"]
        elif r["method"] in ("l1", "l1_group"):
            assert r["reg_iters"] == 0
        else:  # GReg: the library's schedule for this budget, capped by it; measured ratio and prediction kept
            assert 0 < r["reg_iters"] <= s["reg_iters"]
            assert _finite(r["min_mag_ratio"]) and _finite(r["predicted_ratio"]) and r["mag_ratio"]
            if r["method"].startswith("greg2"):
                assert 0 <= r["overlap_l1"] <= 1

    assert _finite(data["base"]["top1"]) and data["base"]["epochs"] >= 1
    assert {(g["target"], g["method"]) for g in data["summary"]} == {(t, m) for t in s["targets"] for m in s["methods"]}
    for g in data["summary"]:
        assert all(_finite(g[k]) for k in ("top1_mean", "top1_std", "removal_top1_mean", "removal_recal_top1_mean",
                                          "macs_fraction_mean"))
    assert all(_finite(c["diff"]) and _finite(c["spread"]) for c in data["comparisons"]["top1"])
    text = md.read_text()
    assert "| target" in text and "without and with BN recalibration" in text and "kept/pruned ratio" in text


def _rows(work: Path) -> list[dict]:
    return [json.loads(line)["row"] for line in (work / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
@needs_fashion
def test_peers_time_budget_then_resume_with_workers(tmp_path: Path, keep_threads) -> None:
    """A run whose time budget is already spent starts no job and says its table is partial; the next run on
    the same work dir reuses the base and, split over two worker processes, does every job exactly once.
    `l1_same_ft` (the GReg paper's comparison) fine-tunes for ft_iters only."""
    peers = _load("peers")
    out, work = tmp_path / "results", tmp_path / "work"
    methods = ("l1", "tp_magnitude", "l1_same_ft")
    common = ["--scale", "smoke", "--methods", *methods, "--out-dir", str(out), "--work-dir", str(work)]
    first = peers.main(common + ["--time-budget", "0"])
    assert first["jobs_done"] == 0 and first["complete"] is False
    assert first["jobs_expected"] == 6  # 2 targets x 3 methods x 1 seed
    assert "Partial: 0 of 6 jobs" in (out / "peers_smoke.md").read_text()
    base_bytes = (work / "base.safetensors").read_bytes()

    second = peers.main(common + ["--jobs", "2"])
    assert second["complete"] is True and second["jobs_done"] == 6
    assert (work / "base.safetensors").read_bytes() == base_bytes  # reused, not retrained
    rows = _rows(work)
    jobs = sorted((r["target"], r["method"], r["seed"]) for r in rows)
    assert jobs == sorted({(t, m, 0) for t in (0.5, 0.125) for m in methods})  # each exactly once
    assert all(_finite(r["top1"]) and _finite(r["wall_s"]) for r in rows)
    s = peers.SCALES["smoke"]
    for r in rows:
        assert r["total_iters"] == (s.ft_iters if r["method"] == "l1_same_ft" else s.reg_iters + s.ft_iters)
    assert "Partial" not in (out / "peers_smoke.md").read_text()


def test_peers_rejects_bad_jobs_count(tmp_path: Path) -> None:
    peers = _load("peers")
    from regprune.errors import UserError

    with pytest.raises(UserError, match="--jobs"):
        peers.main(["--scale", "smoke", "--jobs", "0", "--work-dir", str(tmp_path)])


def test_cost_cuda_only_without_a_gpu_is_one_line(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cost = _load("cost")
    with pytest.raises(SystemExit) as exc:
        cost.H.run_script(lambda: cost.main(["--cuda-only"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]


@pytest.mark.slow
def test_cost_quick_writes_finite_ratios(tmp_path: Path, keep_threads) -> None:
    """benchmarks/cost.py at its quick scale: every ratio it reports is a finite positive number, the TP-direct
    pruning gives regprune's exact model, and the report has each section."""
    cost = _load("cost")
    res = cost.main(["--quick", "--mem-repeats", "1", "--out-dir", str(tmp_path), "--name", "c"])
    assert json.loads((tmp_path / "c.json").read_text())["benchmark"] == "cost"
    p = res["prune"]
    assert p["check"]["tp_direct"]["same_params"] is True
    assert p["check"]["tp_direct"]["max_abs_output_diff_vs_regprune"] < 1e-4
    st = res["steps_cpu"]
    for v in ("greg1", "greg2", "spm", "spm_nuc10"):
        assert _finite(st["cpu_time"]["ratio"][v]) and st["cpu_time"]["ratio"][v] > 0
    assert st["state_at_end"]["greg1"]["greg_phase"] in ("grow", "pick", "stabilize")
    mem = res["memory"]
    assert set(mem["steps"]) == {"plain", "greg1", "greg2", "spm", "spm_nuc10"}
    assert all(_finite(v["peak_mb"]) and v["peak_mb"] > 0 for v in mem["steps"].values())
    md = (tmp_path / "c.md").read_text()
    for section in ("(a) Graph analysis", "(b) Training-step time", "(c) Peak memory"):
        assert section in md


@needs_fashion
def test_peers_gpu_plan_parses_without_a_gpu(keep_threads) -> None:
    """The gpu scale's plan (all 70,000 images, every method x target x seed) is printed and estimated on a
    machine without a GPU."""
    peers = _load("peers")
    res = peers.main(["--scale", "gpu", "--dry-run", "--jobs", "12"])
    s = res["settings"]
    assert s["device"] == "cuda" and s["limit_train"] is None and s["limit_test"] is None and s["seeds"] == 3
    assert res["estimate"]["jobs"] == len(s["methods"]) * len(s["targets"]) * s["seeds"] == 81
    assert res["estimate"]["total_min"] > 0


def test_peers_cpu_plan_keeps_the_fairness_rules(keep_threads) -> None:
    """The cpu scale scores on the whole test set, gives every method that trains before removal at least 1,000
    iterations, uses 3 seeds, 4x and 8x, and the library's GReg schedule reaches its magnitude ratio."""
    peers = _load("peers")
    s = peers.SCALES["cpu"]
    assert s.limit_test is None and s.reg_iters >= 1000 and s.seeds == 3 and s.targets == [0.25, 0.125]
    assert set(s.methods) == set(peers.DEFAULT_METHODS)
    for m in peers.GREG_METHODS:
        lib, kw = peers.greg_kwargs(m, s)
        assert peers.GRegConfig.scaled(s.reg_iters, lib, **kw).predict(lib)["reaches"], m


def test_group_criterion_picks_what_torch_pruning_group_magnitude_picks() -> None:
    """criterion="group" scores a channel over its whole coupled group (root filter, the consumer conv's input
    slice, BN's gamma), the group L1 importance of Torch-Pruning's GroupMagnitudeImportance(p=1): on a ResNet-20
    with random BN, the channels it removes per block are exactly the ones the benchmark's Torch-Pruning
    MagnitudePruner removes at the same widths, while the filter-only criterion removes others."""
    import copy

    from helpers import randomise_bn
    from regprune import create_model, prune

    peers = _load("peers")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    randomise_bn(model)
    x = torch.randn(1, 1, 28, 28)
    ours = prune(model, x, target_macs=0.25, criterion="group")
    filt = prune(model, x, target_macs=0.25)
    assert ours.plan.removal == filt.plan.removal

    theirs_model = copy.deepcopy(model)
    pruner, _, _ = peers.tp_pruner("tp_magnitude", theirs_model, x, 0.25, peers.SCALES["smoke"])
    names = {m: n for n, m in theirs_model.named_modules()}
    theirs = {}
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        theirs[names[dep.target.module]] = sorted(int(i) for i in idxs)
    assert theirs == {r: sorted(v) for r, v in ours.picks.items() if v}
    assert filt.picks != ours.picks  # the two criteria do disagree on this model
