"""`regprune scratch`: search from random init, reach the MACs target, reconfigure exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regprune import UserError, create_model
from regprune.methods.spm import SPMRegularizer, insert_gates
from regprune.scratch import cut_shares, snap_to_budget, spm_settings

ROOT = Path(__file__).resolve().parents[1]


def test_scratch_command_reaches_target_and_reconfigures_exactly(tmp_path):
    run = tmp_path / "sc"
    out = subprocess.run([sys.executable, "-m", "regprune", "scratch", "--model", "resnet20", "--data", "digits",
                          "--target-macs", "0.5", "--epochs", "2", "--batch-size", "64", "--out", str(run),
                          "--no-progress", "--exact-budget"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    assert abs(rep["macs_fraction"] - 0.5) <= 0.03 * 0.5
    assert rep["reconfig_max_abs_diff"] <= 1e-5
    assert rep["verification"]["verified"]  # the reconfiguration went through the same check as every removal
    assert (run / "model.safetensors").exists() and (run / "plots" / "macs.png").exists()
    assert (run / "plots" / "widths.png").exists()
    shares = rep["cut_shares"]  # the report says which part of the cut the search did and which the snap did
    assert shares["search"] + shares["snap"] == pytest.approx(1.0)
    assert rep["settings"]["exact_budget"] is True and rep["snap"]["after"] == pytest.approx(rep["macs_fraction"])
    assert rep["settings"]["mac_norm"] == "matched" and rep["settings"]["mac_scale"] > 0
    assert "MACs loss:" in out.stdout  # the scale is printed at the start


def test_snap_is_off_by_default():
    s = spm_settings(10**7, 90, {})
    assert s["exact_budget"] is False
    assert s["warmup_epochs"] == pytest.approx(8) and s["search_epochs"] == pytest.approx(65)
    assert s["gate_lr_scale"] == 1.0 and s["mac_norm"] == "matched" and s["alpha_mac"] == 0.5
    with pytest.raises(UserError):
        spm_settings(10**7, 10, {"snap_floor": 1.0})


def _reg(target: float) -> SPMRegularizer:
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1)
    return SPMRegularizer(insert_gates(model, torch.zeros(1, 1, 16, 16)), target)


def test_snap_moves_gates_by_importance_with_a_floor():
    reg = _reg(0.6)
    before, res = reg.current_macs() / reg.dense_macs, snap_to_budget(reg, floor=0.25)
    assert before == 1.0 and res.before == 1.0
    assert abs(res.after - 0.6) <= 0.01 * 0.6 and res.flips > 0
    for r in reg.gates.roots:
        on = reg.gates.gate(r).hard()
        assert int(on.sum()) >= max(1, -(-reg.gates.groups[r].channels // 4))  # the floor held
        imp = reg.channel_importance(r)
        if (~on).any() and on.any():
            # within a group, every channel turned off is less important than every channel kept
            assert float(imp[~on].max()) <= float(imp[on].min())


def test_snap_terminates_where_one_channel_is_wider_than_the_window():
    """A stage-1 stream channel of ResNet-20 is worth more MACs than the 1% window: the snap must stop, not
    toggle it forever."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    reg = SPMRegularizer.attach(model, torch.zeros(1, 1, 28, 28), 0.41)
    gates = {r: reg.gates.gate(r) for r in reg.gates.roots}

    def frac() -> float:
        return reg.current_macs() / reg.dense_macs

    with torch.no_grad():
        for g in gates.values():
            g.weight.fill_(0.9)
        for r in [r for r in gates if r.endswith("conv1") and r != "conv1"][::-1]:
            for i in range(gates[r].weight.numel() - 1):
                if frac() <= 0.41 + 0.012:
                    break
                gates[r].weight[i] = 0.1
    start = frac()
    assert 0.41 * 1.01 < start < 0.41 + 0.015
    res = snap_to_budget(reg, floor=0.0)
    assert res.before == pytest.approx(start) and res.after == pytest.approx(frac())
    assert abs(res.after - 0.41) <= 0.01 * 0.41 or res.undone >= 1


def test_cut_shares():
    assert cut_shares(0.33, 0.125) == pytest.approx({"search": 0.67 / 0.875, "snap": 0.205 / 0.875})
    assert cut_shares(0.5, 0.5) == {"search": 1.0, "snap": 0.0}


def test_scratch_dry_run_prints_the_papers_schedule():
    out = subprocess.run([sys.executable, "-m", "regprune", "scratch", "--recipe", "recipes/resnet50-imagenet-spm.yaml",
                          "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "shared across a residual stream" in out.stdout
    assert "search (gates learning, losses on) for 65" in out.stdout and "label smoothing 0.1" in out.stdout
    assert "no snap, as in the paper" in out.stdout and "with 8 warm-up epochs" in out.stdout
    assert "MACs loss: " in out.stdout and "matched scale" in out.stdout
