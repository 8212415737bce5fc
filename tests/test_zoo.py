"""The torchvision zoo in CI: `regprune.prune(model, x, speedup=2.0)` on torchvision's classifiers ends in one
of two ways only, a verified model at the speedup asked or a one-line `UserError`; never another exception.

`benchmarks/zoo.py` runs every torchvision classifier (results in `benchmarks/results/zoo.md`); this test runs
the 35 under ~30 M parameters that fit the CI budget (1.0-1.7 min for the whole module on 2 shared cores).
Left to the benchmark, with the reason:

- over ~30 M parameters (AlexNet, VGG, ResNet-101/152, wide ResNets, ResNeXt-101, RegNet 8 GF and up,
  EfficientNet-B6/B7/V2-M/V2-L, ConvNeXt-S/B/L, Swin-S/B, ViTs, MaxViT-T at 30.4 M): the benchmark only
  analyses them, and they are slow on 2 cores;
- Inception-v3: its train-mode auxiliary head needs a 299x299 input (75 in eval mode), where the safety trial
  bisects to the groups the auxiliary head reads: 90-150 s and more;
- DenseNet-161/169/201: 35-130 s each, and DenseNet-121 covers the same concatenation structure;
- Swin-T and Swin-V2-T: refused at 64x64 (their windows pad the small late feature maps, and attention over the
  padding caps the speedup below 2x); the benchmark's second try at 224 px reaches 2x, and one test below runs
  that for Swin-T through the benchmark itself.

Inputs are 64x64 (the benchmark's size for all of these), 10 classes, random weights. Marked slow. The cases
run on one torch thread (restored afterwards), as the benchmark's workers do: on 2 shared cores the many small
operations of tracing and verification run up to 10x slower on two threads than on one (threads spin-waiting
for each other while other processes hold the cores), which would make the test's time depend on the load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regprune
from regprune.counting import count_macs

from helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
SPEEDUP = 2.0
TOLERANCE = 0.02

# torchvision classifiers under ~30 M parameters, less those the docstring leaves to the benchmark
ZOO = [
    "convnext_tiny", "densenet121",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
    "efficientnet_v2_s", "googlenet",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf",
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1",
]
INPUT_SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_prune_speedup_2(name: str) -> None:
    torch.manual_seed(0)
    model = regprune.create_model(f"torchvision.{name}", num_classes=10)
    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        result = regprune.prune(model, x, speedup=SPEEDUP)
    except regprune.UserError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg, f"a refusal must be one line: {msg!r}"
        return
    speedup = count_macs(model, x) / count_macs(result.model, x)
    assert abs(speedup - SPEEDUP) <= TOLERANCE * SPEEDUP, f"measured speedup {speedup:.4f}x for {SPEEDUP}x"
    assert result.verification is not None and result.verification["verified"] is True, result.verification
    with torch.no_grad():
        assert model.eval()(x).shape == result.model.eval()(x).shape


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed `regprune` command (or `python -m regprune` where no script sits next to the interpreter)."""
    script = Path(sys.executable).with_name("regprune")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "regprune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the module docstring
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_zoo_cli_inspect_speedup_json() -> None:
    proc = _cli("inspect", "--model", "torchvision.squeezenet1_1", "--speedup", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert "verification" in out and out["verification"]["verified"] is True
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_zoo_cli_unreachable_speedup_is_one_line() -> None:
    proc = _cli("inspect", "--model", "resnet56", "--speedup", "1000")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("regprune: error:"), proc.stderr
    assert "out of reach" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_zoo_swin_refused_at_64_reaches_2x_at_224(tmp_path: Path) -> None:
    """Swin-T at 64 px is refused (its 7x7 windows pad the 4x4 and 2x2 feature maps of the late stages, so
    attention over padding dominates the MACs and the MLP widths cannot give 2x); the benchmark then tries 224 px,
    where it reaches 2x verified. Both tries are in the record."""
    zoo = load_benchmark("zoo")
    data = zoo.main(["--models", "torchvision.swin_t", "--jobs", "1", "--timeout", "240", "--out", str(tmp_path)])
    rec = data["results"][0]
    assert rec["first_try"]["input_size"] == INPUT_SIZE and rec["first_try"]["outcome"] == "refused"
    assert "out of reach" in rec["first_try"]["reason"]
    assert rec["input_size"] == 224 and rec["outcome"] == "reached" and rec["verified"] is True, rec
    assert abs(rec["speedup"] - SPEEDUP) <= TOLERANCE * SPEEDUP
    assert data["counts"]["reached"] == 1 and "swin_t | 224 (at 64: refused)" in (tmp_path / "zoo.md").read_text()


@pytest.mark.slow
def test_zoo_inspect_cli_times_the_command(tmp_path: Path) -> None:
    zoo = load_benchmark("zoo")
    data = zoo.main(["--inspect-cli", "--models", "torchvision.squeezenet1_1", "torchvision.vit_h_14",
                     "--max-params", "100", "--jobs", "1", "--out", str(tmp_path), "--name", "zi"])
    squeeze, vit = data["results"]
    assert squeeze["outcome"] == "inspected" and squeeze["wall_s"] > 0 and squeeze["groups"] > 0
    assert squeeze["header"].startswith("torchvision.squeezenet1_1: ")
    assert vit["outcome"] == "over" and vit["params"] > 100e6
    md = (tmp_path / "zi.md").read_text()
    assert "| squeezenet1_1 |" in md and "| vit_h_14 |" in md
