"""benchmarks/peers.py runs end to end at its smoke scale and writes finite numbers for every method and target."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from regprune.data.mnist import FASHION_MNIST_DEFAULT_PATH

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_PATH),
                                   reason="Debian package dataset-fashion-mnist not installed")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
    # one job per target x seed x method, every regprune and Torch-Pruning method present
    assert set(s["methods"]) == set(peers.METHODS)
    assert sorted((r["target"], r["method"], r["seed"]) for r in rows) == sorted(
        (t, m, k) for t in s["targets"] for m in s["methods"] for k in range(s["seeds"]))
    for r in rows:
        for key in ("top1", "before_ft_top1", "macs", "macs_fraction", "params", "reg_iters", "wall_s"):
            assert _finite(r[key]), (r["method"], key, r[key])
        assert 0 <= r["top1"] <= 100
        # same MACs for every method: within a few percent of the target even at smoke granularity
        assert abs(r["macs_gap"]) < 0.06, (r["method"], r["target"], r["macs_fraction"])
        assert r["ft_epochs"] == s["ft_epochs"]  # identical fine-tuning
    # the sparse Torch-Pruning pruners and regprune's regularizers get the same iteration budget
    for r in rows:
        if r["method"] in ("tp_bnscale", "tp_groupnorm", "tp_growingreg", "spm"):
            assert r["reg_iters"] == s["reg_iters"], r["method"]
        elif r["method"] in ("l1", "tp_magnitude"):
            assert r["reg_iters"] == 0
        else:
            assert 0 < r["reg_iters"] <= 2 * s["reg_iters"]

    assert _finite(data["base"]["top1"]) and data["base"]["epochs"] >= 1
    assert {(g["target"], g["method"]) for g in data["summary"]} == {(t, m) for t in s["targets"] for m in s["methods"]}
    for g in data["summary"]:
        assert all(_finite(g[k]) for k in ("top1_mean", "top1_std", "macs_fraction", "mmacs", "params_m"))
    assert all(_finite(c["diff"]) and _finite(c["spread"]) for c in data["comparisons"])
    assert "| target" in md.read_text()
