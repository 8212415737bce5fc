"""Checked ONNX export: the file is run in ONNX Runtime against the PyTorch model before it is kept."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import regprune
from regprune.cli import main
from regprune.errors import UserError
from regprune.export import DEFAULT_ATOL, OnnxExport, export_onnx
from regprune.models import create_model

ort = pytest.importorskip("onnxruntime")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """The real CLI in-process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regprune: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    """A half-width resnet20 written with regprune.save."""
    torch.manual_seed(0)
    res = regprune.prune(create_model("resnet20"), torch.randn(1, 3, 32, 32), ratios="0.5")
    path = tmp_path_factory.mktemp("model") / "pruned.safetensors"
    regprune.save(res.model, path)
    return path


class TracingDiffers(nn.Module):
    """Computes something else while being exported: its ONNX graph is not the module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if torch.onnx.is_in_onnx_export():
            y = y * 1.5
        return y


class FixedBatch(nn.Module):
    """Reads the batch size as a Python int: the trace bakes in the example's batch of 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(int(x.shape[0]), -1)


def test_pruned_model_exports_with_the_check_printed(pruned_file, tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    code, stdout, err = run_cli(capsys, "export", pruned_file, "--onnx", out)
    assert code == 0, err
    assert "batch 1 and 4" in stdout and "max |diff|" in stdout and "max relative diff" in stdout
    assert f"wrote {out}" in stdout
    assert sorted(os.listdir(out.parent)) == ["m.onnx"]  # no temporary left beside it

    # the kept file really is the model, at a batch size the check did not use either
    model, _ = regprune.load(pruned_file)
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype("float32")
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    ref = model.eval()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - ref).max() <= DEFAULT_ATOL * max(1.0, np.abs(ref).max())


def test_python_api_returns_path_and_figures(pruned_file, tmp_path):
    res = export_onnx(pruned_file, tmp_path / "m.onnx")
    assert isinstance(res, OnnxExport) and res.path == tmp_path / "m.onnx" and os.fspath(res) == str(res.path)
    assert res.sample_shape == (3, 32, 32)
    c = res.check
    assert c.passed and c.batch_sizes == (1, 4) and set(c.by_batch) == {1, 4}
    assert 0 <= c.max_abs_diff <= c.tolerance == pytest.approx(DEFAULT_ATOL * max(1.0, c.output_scale))
    assert c.max_rel_diff == pytest.approx(c.max_abs_diff / c.output_scale)
    assert c.output_scale > 0
    assert c.to_dict()["passed"] is True


def test_export_whose_graph_differs_is_refused_and_existing_file_kept(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's earlier export")
    with pytest.raises(UserError, match=r"refused: .*max \|diff\|") as exc:
        export_onnx(TracingDiffers(), out, input_size=8, overwrite=True)
    assert "\n" not in str(exc.value)
    assert out.read_bytes() == b"the user's earlier export"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]

    fresh = tmp_path / "new" / "m.onnx"
    with pytest.raises(UserError, match="refused"):
        export_onnx(TracingDiffers(), fresh, input_size=8)
    assert not fresh.parent.exists()  # the folder this call made is gone too


def test_batch_size_fixed_in_graph_is_refused(tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"refused: .*shape .* at batch 4"):
        export_onnx(FixedBatch(), out, input_size=8)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_refuses_when_onnxruntime_disagrees(pruned_file, tmp_path, capsys, monkeypatch):
    real_run = ort.InferenceSession.run

    def off_by_a_little(self, output_names, feed, *a, **kw):
        return [o + 0.01 for o in real_run(self, output_names, feed, *a, **kw)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_a_little)
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli(capsys, "export", pruned_file, "--onnx", out)
    assert_one_line_error(code, err, "refused", "max |diff|", "max relative diff", "nothing written")
    assert not out.exists() and os.listdir(tmp_path) == []

    out.write_bytes(b"keep me")
    before = out.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "export", pruned_file, "--onnx", out, "--overwrite")
    assert_one_line_error(code, err, "refused")
    assert out.read_bytes() == b"keep me" and out.stat().st_mtime_ns == before
    assert os.listdir(tmp_path) == ["m.onnx"]

    # a looser tolerance accepts the same difference: --atol is what decides
    code, stdout, err = run_cli(capsys, "export", pruned_file, "--onnx", out, "--overwrite", "--atol", "0.01")
    assert code == 0, err
    assert "tolerance" in stdout and out.read_bytes() != b"keep me"


def test_existing_file_needs_overwrite(pruned_file, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    code, _, err = run_cli(capsys, "export", pruned_file, "--onnx", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"mine"


def test_negative_atol_is_a_user_error(pruned_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", pruned_file, "--onnx", tmp_path / "m.onnx", "--atol", "-1")
    assert_one_line_error(code, err, "--atol")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_missing_extra_names_it(pruned_file, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "export", pruned_file, "--onnx", out)
    assert_one_line_error(code, err, "pip install 'regprune[export]'", missing)
    assert os.listdir(tmp_path) == []
