"""More user mistakes that must end in one line `regprune: error: ...` with exit status 2, no traceback, and
nothing on disk lost: a wrong --in-channels at export, a model too big for the dataset's images, mistyped --greg
values, non-finite or out-of-range numbers, and --overwrite with a typo in the data or the base."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import traceback
from pathlib import Path

import pytest
import torch

from regprune.errors import UserError
from regprune.jobs.options import COMMAND_DEFAULTS, OPTIONS, Option, check_value, merge_options


def run_cli(*argv) -> tuple[int, str]:
    """The real CLI in-process: (exit status, stderr); an escaped exception shows up as a traceback on stderr."""
    from regprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    return code, err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> str:
    """The single error line, once checked: status 2, one line, no traceback, every needle in it."""
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regprune: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under `root` with its content digest (None for folders)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in [root, *sorted(root.rglob("*"))]}


TINY = ("--data", "digits", "--limit-train", "32", "--limit-test", "16", "--no-progress")
# short runs, so that a case that is wrongly accepted fails quickly instead of training for long (later flags win)
SHORT = {"train": ["--epochs", "0.01"], "scratch": ["--epochs", "0.01"],
         "prune": ["--method", "greg1", "--reg-iters", "2", "--ft-epochs", "0", "--bn-recal", "0"]}


# ---- 1. export with the wrong --in-channels ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_channel_file(tmp_path_factory) -> Path:
    """A resnet20 for 1-channel 8-px images (as trained on digits), written with regprune's model format."""
    from regprune.models import create_model
    from regprune.surgery import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    save_model(create_model("resnet20", num_classes=10, in_channels=1), path, {"input_size": 8})
    return path


def test_export_with_wrong_in_channels_names_the_mismatch(one_channel_file, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "sub" / "m.onnx"
    code, err = run_cli("export", one_channel_file, "--onnx", out, "--in-channels", "3")
    one_line_error(code, err, "--in-channels 3", "built for 1 input channel")
    assert not (tmp_path / "sub").exists()


def test_export_of_a_model_that_cannot_run_on_the_input_shape(tmp_path):
    pytest.importorskip("onnxruntime")
    from regprune.export import export_onnx
    from regprune.models import create_model

    with pytest.raises(UserError, match=r"does not run on inputs of shape \(1, 3, 8, 8\)"):
        export_onnx(create_model("vgg11"), tmp_path / "m.onnx", input_size=8)
    assert list(tmp_path.iterdir()) == []
    code, err = run_cli("export", tmp_path / "missing.safetensors", "--onnx", tmp_path / "m.onnx", "--input-size", "0")
    one_line_error(code, err, "--input-size", ">= 1")


# ---- 2. a model too big for the dataset's images ------------------------------------------------------------------
@pytest.mark.parametrize("command, extra", [("train", []), ("prune", ["--base", "random", "--speedup", "2"]),
                                            ("scratch", ["--target-macs", "0.5"])])
def test_input_too_small_for_the_model_is_one_line(command, extra, tmp_path, one_thread):
    out = tmp_path / "run"
    code, err = run_cli(command, *SHORT[command], *extra, "--model", "vgg11", *TINY, "--out", out)
    one_line_error(code, err, "vgg11", "1x8x8", "digits", "too small")
    assert not out.exists()


# ---- 3. --greg values of the wrong type ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting, needles", [
    ("update_reg_interval=abc", ("--greg update_reg_interval", "of type int", "'abc'")),
    ("update_reg_interval=2.5", ("--greg update_reg_interval", "of type int", "2.5")),
    ("reg_granularity_prune=abc", ("--greg reg_granularity_prune", "of type float", "'abc'")),
    ("reg_upper_limit=true", ("--greg reg_upper_limit", "of type float", "True")),
    ("lr_prune=NaN", ("--greg lr_prune", "finite")),
    ("pick=3", ("--greg pick", "of type str")),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_greg_type_errors_name_the_setting_and_type(setting, needles, dry_run, tmp_path):
    out = tmp_path / "run"
    argv = ["prune", *SHORT["prune"], "--model", "resnet20", "--base", "random", "--speedup", "2",
            "--greg", setting, *TINY, "--out", out] + (["--dry-run"] if dry_run else [])
    one_line_error(*run_cli(*argv), *needles)
    assert not out.exists()


def test_greg_values_of_the_right_type_still_pass(capsys):
    o = merge_options(COMMAND_DEFAULTS["prune"], {"model": "resnet20", "speedup": 2.0, "method": "greg1"},
                      greg=["update_reg_interval=5", "lr_prune=1", "track_layers=[\"conv1\"]", "record_every=null"])
    from regprune.jobs import greg_config

    cfg = greg_config(o, 1)
    assert cfg.update_reg_interval == 5 and cfg.lr_prune == 1.0 and isinstance(cfg.lr_prune, float)
    assert tuple(cfg.track_layers) == ("conv1",) and cfg.record_every is None


# ---- 4. numbers the schema must refuse ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["scratch", "--target-macs", "0.5", "--alpha-mac", "nan"], ("alpha_mac", "finite", "nan")),
    (["scratch", "--target-macs", "0.5", "--alpha-mac", "inf"], ("alpha_mac", "finite", "inf")),
    (["scratch", "--target-macs", "0.5", "--tie-spread=-inf"], ("tie_spread", "finite")),
    (["scratch", "--target-macs", "0.5", "--nuc-every", "0"], ("nuc_every", ">= 1")),
    (["prune", "--base", "random", "--speedup", "2", "--method", "greg1", "--reg-batch-size", "0"],
     ("reg_batch_size", ">= 1", "got 0")),
    (["prune", "--base", "random", "--speedup", "2", "--method", "greg1", "--reg-iters", "0"], ("reg_iters", ">= 1")),
    (["prune", "--base", "random", "--speedup", "2", "--ft-lr", "nan"], ("ft_lr", "finite")),
    (["prune", "--base", "random", "--speedup", "2", "--round-to", "0"], ("round_to", ">= 1")),
    (["train", "--momentum", "1"], ("momentum", "[0, 1)")),
    (["train", "--label-smoothing", "1.5"], ("label_smoothing", "[0, 1)")),
    (["train", "--weight-decay", "-0.1"], ("weight_decay", ">= 0")),
    (["train", "--workers", "-1"], ("workers", ">= 0")),
    (["train", "--epochs", "nan"], ("epochs", "finite")),
])
def test_out_of_range_numbers_are_refused_before_a_run_directory(argv, needles, tmp_path):
    out = tmp_path / "run"
    command, *bad = argv
    one_line_error(*run_cli(command, *SHORT[command], *bad, "--model", "resnet20", *TINY, "--out", out), *needles)
    assert not out.exists()


@pytest.mark.parametrize("argv, needles", [
    (["--input-size", "0"], ("--input-size", ">= 1")),
    (["--num-classes", "0"], ("--num-classes", ">= 1")),
    (["--in-channels", "-1"], ("--in-channels", ">= 1")),
    (["--speedup", "nan"], ("speedup", "finite")),
    (["--round-to", "0"], ("round_to", ">= 1")),
])
def test_inspect_refuses_bad_numbers(argv, needles):
    one_line_error(*run_cli("inspect", "--model", "resnet20", *argv), *needles)


def test_recipe_nan_is_refused(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("alpha_mac: .nan\n")  # YAML's NaN
    with pytest.raises(UserError, match="option alpha_mac must be a finite number, got nan"):
        merge_options(COMMAND_DEFAULTS["scratch"], {}, recipe=str(r))


def test_every_default_fits_its_own_bounds_and_a_field_may_allow_non_finite():
    for o in OPTIONS.values():
        assert check_value(o, o.default) == o.default, o.flat
    for defaults in COMMAND_DEFAULTS.values():
        for k, v in defaults.items():
            assert check_value(OPTIONS[k], v) == v
    unbounded = Option("run", "x", "x", float, 0.0, {"finite": False})
    assert check_value(unbounded, math.inf) == math.inf
    with pytest.raises(UserError, match="finite"):
        check_value(Option("run", "x", "x", float, 0.0, {}), math.inf)


# ---- 5. --overwrite with a typo leaves the old run alone -----------------------------------------------------------
def _old_run(path: Path) -> None:
    (path / "checkpoints").mkdir(parents=True)
    (path / "options.json").write_text('{"run": {"model": "resnet20"}}')
    (path / "state.json").write_text('{"done": ["train"], "results": {}, "job": "train"}')
    (path / "model.safetensors").write_bytes(b"\x00precious weights\x01" * 100)
    (path / "checkpoints" / "train.pt").write_bytes(b"precious checkpoint")


@pytest.mark.parametrize("argv, needles", [
    (["train", "--model", "resnet20", "--data", "digitz"], ("unknown dataset", "digitz")),
    (["train", "--model", "resnet20", "--data", "cifar10:/nonexistent/cifar"], ("not found",)),
    (["prune", "--model", "resnet20", "--data", "digits", "--base", "{t}/nosuch.safetensors", "--speedup", "2"],
     ("nosuch.safetensors", "does not exist")),
    (["scratch", "--model", "resnet20", "--data", "digitz", "--target-macs", "0.5"], ("unknown dataset",)),
    (["prune", "--model", "resnet20", "--data", "digits", "--base", "random", "--ratios", "nosuch*:0.5"],
     ("matches no",)),
    (["train", "--model", "vgg11", "--data", "digits"], ("vgg11", "too small")),
])
def test_overwrite_keeps_the_old_run_when_data_or_base_is_wrong(argv, needles, tmp_path, one_thread):
    old = tmp_path / "old"
    _old_run(old)
    before = snapshot(old)
    command, *rest = [a.format(t=tmp_path) for a in argv]
    one_line_error(*run_cli(command, *SHORT[command], *rest, "--no-progress", "--out", old, "--overwrite"), *needles)
    assert snapshot(old) == before


def test_inspect_zero_targets_are_refused_not_ignored(capsys) -> None:
    from regprune.cli import main

    for flag in ("--speedup", "--target-macs"):
        assert main(["inspect", "--model", "resnet20", flag, "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("regprune: error:") and "out of range" in err[0]


def test_unknown_greg_setting_lists_the_known_ones(capsys) -> None:
    from regprune.cli import main

    rc = main(["prune", "--model", "resnet20", "--data", "digits", "--method", "greg1", "--speedup", "2",
               "--greg", "update_reg_intervall=5", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "unknown GReg setting 'update_reg_intervall' (did you mean update_reg_interval?)" in err[0]
    assert "known: " in err[0] and "reg_granularity_prune" in err[0]


def test_out_of_memory_is_one_line(monkeypatch, capsys) -> None:
    from regprune import cli

    def boom(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 120000000000 bytes.")

    monkeypatch.setitem(cli.COMMANDS, "inspect", boom)
    assert cli.main(["inspect", "--model", "resnet20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("regprune: error: out of memory")
