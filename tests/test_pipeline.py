"""End-to-end: the commands and the Python API on tiny real data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import regprune
from regprune.counting import count_macs

from helpers import regularize

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "regprune", *args], capture_output=True, text=True, cwd=ROOT, env=ENV)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_inspect_json_reports_papers_speedup():
    out = cli("inspect", "--model", "resnet56", "--ratios", "[0,0.75,0.75,0.32,0]", "--json")
    data = json.loads(out.stdout)
    assert data["dense_macs"] == 125485696
    assert round(data["speedup"], 2) == 2.55
    assert data["pruned_params"] < data["dense_params"]
    assert data["pruned_macs"] < data["dense_macs"]


def test_inspect_table_explains_scope():
    out = cli("inspect", "--model", "torchvision.resnet18", "--input-size", "64")
    assert "residual-coupled" in out.stdout and "network output" in out.stdout
    assert "layer1.0.conv1" in out.stdout


def test_dry_run_prints_plan_and_schedule():
    out = cli("prune", "--recipe", "recipes/resnet56-cifar10-greg2.yaml", "--dry-run")
    assert "speedup 2.55x" in out.stdout
    assert "pick 10000" in out.stdout and "iterations" in out.stdout
    assert "predicted: integrated decay" in out.stdout and "pick phase integrates 0.50" in out.stdout
    # a budget too short for the ratio is said before anything runs, with the iterations it would need
    short = cli("prune", "--model", "resnet20", "--data", "mnist5k", "--base", "random", "--method", "greg1",
                "--speedup", "2", "--reg-iters", "100", "--dry-run")
    assert "warning: the schedule integrates a decay of" in short.stdout and "iterations" in short.stdout
    unstructured = cli("prune", "--recipe", "recipes/resnet50-imagenet-unstructured-greg1.yaml", "--dry-run")
    assert "fc" in unstructured.stdout and "layer4.2.conv3" in unstructured.stdout and "conv1" in unstructured.stdout


def test_demo_quick_end_to_end(tmp_path):
    out = cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert "pruned (greg1)" in out.stdout
    run = tmp_path / "demo" / "greg1"
    report = json.loads((run / "report.json").read_text())
    assert 1.9 <= report["macs_speedup"] <= 2.1
    for name in ("model.safetensors", "widths.json", "picks.json", "plots/widths.png", "plots/penalty.png"):
        assert (run / name).exists(), name
    assert list((run / "plots").glob("filter_norms_*.png"))
    # the pruned model file evaluates and exports
    ev = cli("eval", str(run / "model.safetensors"), "--data", "mnist5k", "--limit-test", "100")
    assert "top1" in ev.stdout
    onnx_path = tmp_path / "m.onnx"
    cli("export", str(run / "model.safetensors"), "--onnx", str(onnx_path))
    import onnxruntime as ort

    model, _ = regprune.load(run / "model.safetensors")
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype("float32")
    ort_out = ort.InferenceSession(str(onnx_path)).run(None, {"input": x})[0]
    ref = model.eval()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(ort_out - ref).max() < 1e-4


def test_l1_prune_command(tmp_path):
    cli("train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "base"),
        "--no-progress", "--batch-size", "64")
    out = cli("prune", "--method", "l1", "--model", "resnet20", "--base", str(tmp_path / "base" / "model.safetensors"),
              "--data", "digits", "--ratios", "*.conv1:0.5", "--ft-epochs", "1", "--out", str(tmp_path / "l1"),
              "--no-progress", "--batch-size", "64")
    assert "pruned (l1)" in out.stdout and "verified: the pruned model equals the dense one" in out.stdout
    report = json.loads((tmp_path / "l1" / "report.json").read_text())
    assert report["verification"]["verified"] and report["verification"]["modes"] == ["eval", "train"]
    widths = json.loads((tmp_path / "l1" / "widths.json").read_text())
    assert widths["layer1.0.conv1"] == {"dense": 16, "kept": 8}
    assert widths["layer1.0.conv2"] == {"dense": 16, "kept": 16}
    assert "BN recalibration (100 batches): top-1 right after removal" in out.stdout or \
        "BN recalibration (" in out.stdout
    assert report["pruned_before_bn_recal"]["top1"] >= 0 and report["pruned_before_finetune"]["bn_recal_batches"] > 0

    # --criterion group reaches the picks: they are the Python API's group picks on the same base
    cli("prune", "--method", "l1", "--criterion", "group", "--model", "resnet20", "--base",
        str(tmp_path / "base" / "model.safetensors"), "--data", "digits", "--ratios", "*.conv1:0.5", "--ft-epochs", "1",
        "--out", str(tmp_path / "l1g"), "--no-progress", "--batch-size", "64")
    base, _ = regprune.load(tmp_path / "base" / "model.safetensors")
    x = torch.zeros(1, 1, 8, 8)
    expected = regprune.prune(base, x, ratios="*.conv1:0.5", criterion="group").picks
    got = json.loads((tmp_path / "l1g" / "picks.json").read_text())
    assert {k: sorted(v) for k, v in got.items() if v} == {k: sorted(v) for k, v in expected.items() if v}
    assert got != json.loads((tmp_path / "l1" / "picks.json").read_text())


def test_greg_run_warns_about_a_short_schedule(tmp_path):
    # the schedule's own warning (what --dry-run prints) is said once when a real run starts regularizing, and kept
    out = cli("prune", "--method", "greg1", "--model", "resnet20", "--base", "random", "--data", "digits",
              "--speedup", "2", "--reg-iters", "20", "--ft-epochs", "0.05", "--limit-train", "64", "--limit-test", "32",
              "--batch-size", "32", "--bn-recal", "1", "--out", str(tmp_path / "g"), "--no-progress")
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "the schedule integrates a decay of" in warnings[0], out.stderr[-3000:]
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["regularize"]["warning"] == warnings[0][len("warning: "):]


class TinyNet(nn.Module):
    """A user's own model, not from the registry."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_python_prune_on_own_module():
    model = TinyNet()
    x = torch.randn(4, 1, 8, 8)
    res = regprune.prune(model, x, method="l1", ratios="c1:0.5")
    assert res.model.c1.out_channels == 8 and res.model.c2.in_channels == 8
    assert model.c1.out_channels == 16  # the original is untouched
    assert count_macs(res.model, x) < count_macs(model, x)
    assert res.model(x).shape == (4, 10)


def test_regularizer_in_a_plain_training_loop():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    reg = regprune.regularizer(model, x, method="greg1", ratios="c1:0.5", iters=200)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    assert regularize(reg, model, opt, [(x, y)], max_steps=1000) <= 200
    picks = reg.picks()["c1"]
    norms = model.c1.weight.detach().abs().flatten(1).mean(1)
    kept = [i for i in range(16) if i not in picks]
    assert norms[picks].mean() < norms[kept].mean() / 5
    pruned = reg.prune()
    assert pruned.c1.out_channels == 8 and pruned(x).shape == (64, 10)
