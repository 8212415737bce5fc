"""A catalogue of bad inputs to the `regprune` command line.

Every case runs the real CLI (in-process through `main()`; a sample also in a subprocess) and must end the same way: exactly one line on stderr, starting
`regprune: error:`, exit status 2, no traceback, every file that existed before left byte-for-byte (and
mtime-for-mtime) as it was, and nothing created outside the run directory the case named. Cases caught from
the options alone must not even create that run directory. Hostile files (pickles with a payload, a YAML
recipe with a python tag) must be refused without their payload running: it would create a marker.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str | os.PathLike, timeout: float = 300, subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI; in-process by default (the same `main()` the console script calls, without paying a
    torch import per case), in a real subprocess when asked or when REGPRUNE_TEST_SUBPROCESS=1."""
    argv = [str(a) for a in args]
    if subprocess_run or os.environ.get("REGPRUNE_TEST_SUBPROCESS") == "1":
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        return subprocess.run([sys.executable, "-m", "regprune", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    import contextlib
    import io
    import traceback

    from regprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # an escaped exception is what a user would see as a traceback
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under `roots`: content digest (files), size and mtime."""
    out: dict[str, tuple] = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p)] = (digest, st.st_size if digest else None, st.st_mtime_ns, st.st_mode)
    return out


# ---------------------------------------------------------------------------------------------- hostile payloads
class _Payload:
    """Unpickling this calls os.mkdir(marker): if the marker exists afterwards, the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------------------------------------- shared files
def _cifar_folder(root: Path, corrupt: Callable[[bytes], bytes]) -> Path:
    """A CIFAR-10 python folder of tiny valid batches, with data_batch_1 passed through `corrupt`."""
    root.mkdir(parents=True)
    batch = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    good = pickle.dumps(batch, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(corrupt(good) if name == "data_batch_1" else good)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Model files (good, truncated, mismatched, hostile), CIFAR folders, recipes: built once, never changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from regprune.models import create_model
    from regprune.surgery import save_model

    a = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    good = save_model(create_model("resnet20", num_classes=10, in_channels=1), a / "good.safetensors")
    raw = good.read_bytes()
    (a / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    # the right header and names, but conv1 narrowed and fc.bias gone: the error must name both
    with safe_open(str(good), framework="pt") as f:
        header = f.metadata()
    state = load_file(str(good))
    state["conv1.weight"] = torch.zeros(8, 1, 3, 3)
    del state["fc.bias"]
    save_file(state, str(a / "mismatched.safetensors"), metadata=header)

    # pickles whose loading would run code: raw protocol 2, torch.save's zip format, protocol 0 (text)
    (a / "evil_p2.safetensors").write_bytes(pickle.dumps(_Payload(a / "PWNED_p2"), protocol=2))
    with open(a / "evil_zip.pt", "wb") as f:
        torch.save({"model": _Payload(a / "PWNED_zip")}, f)
    (a / "evil_p0.safetensors").write_bytes(pickle.dumps(_Payload(a / "PWNED_p0"), protocol=0))

    _cifar_folder(a / "cifar_garbage", lambda b: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    _cifar_folder(a / "cifar_truncated", lambda b: b[: len(b) // 3])

    (a / "bad_syntax.yaml").write_text("model: resnet20\nratios: [0, 0.5\n  speedup: : 2\n")
    (a / "python_tag.yaml").write_text(f"model: resnet20\nspeedup: !!python/object/apply:os.mkdir ['{a / 'PWNED_yaml'}']\n")
    (a / "list.yaml").write_text("- model\n- resnet20\n")
    (a / "unknown_key.yaml").write_text("model: resnet20\nspeedup: 2\nfrobnicate: true\n")
    (a / "wrong_type.yaml").write_text("model: resnet20\nspeedup: fast\n")
    (a / "a_file").write_text("a regular file, so nothing can be created under it\n")
    return a


# ---------------------------------------------------------------------------------------------- the catalogue
@dataclass
class Case:
    args: Callable[[Path, Path], list]   # (assets, tmp) -> argv after `regprune`
    expect: tuple[str, ...] = ()         # substrings of the error line
    early: bool = True                   # caught before a run directory is created
    markers: tuple[str, ...] = ()        # payload markers (in assets) that must not appear
    setup: Callable[[Path], None] | None = field(default=None)  # prepares files in tmp before the run


def prune(*extra: str) -> Callable[[Path, Path], list]:
    base = ["prune", "--model", "resnet20", "--data", "digits", "--no-progress", "--method", "l1"]
    return lambda a, t: base + ["--out", t / "run"] + [str(x).format(a=a, t=t) for x in extra]


def train(*extra: str) -> Callable[[Path, Path], list]:
    base = ["train", "--model", "resnet20", "--data", "digits", "--no-progress", "--epochs", "1"]
    return lambda a, t: base + ["--out", t / "run"] + [str(x).format(a=a, t=t) for x in extra]


def _existing_run(t: Path) -> None:
    run = t / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "state.json").write_text('{"done": ["base"], "results": {}}')
    (run / "model.safetensors").write_bytes(b"\x00precious weights\x01" * 100)
    (run / "checkpoints" / "finetune.pt").write_bytes(b"precious checkpoint")
    os.utime(run / "model.safetensors", ns=(1_000_000_000, 1_000_000_000))


def _not_a_run(t: Path) -> None:
    (t / "notarun").mkdir()
    (t / "notarun" / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")


def _corrupt_options(t: Path) -> None:
    (t / "broken").mkdir()
    (t / "broken" / "options.json").write_text('{"model": "resnet20", "data": ')
    (t / "broken" / "state.json").write_text('{"done": [], "results": {}}')


def _corrupt_state(t: Path) -> None:
    (t / "broken").mkdir()
    (t / "broken" / "options.json").write_text(
        '{"model": "resnet20", "data": "digits", "method": "l1", "base": "random", "speedup": 2.0, "progress": false}')
    (t / "broken" / "state.json").write_bytes(b"\xff\xfe\x00 garbage")


RANDOM = ("--base", "random")
CASES: dict[str, Case] = {
    # ratio strings and targets
    "ratio-out-of-range": Case(prune(*RANDOM, "--ratios", "x:2"), ("out of range",), early=False),
    "ratio-unbalanced-bracket": Case(prune(*RANDOM, "--ratios", "[0,0.5"), ("unbalanced",), early=False),
    "ratio-not-a-number": Case(prune(*RANDOM, "--ratios", "*.conv1:half"), ("bad ratio",), early=False),
    "ratio-pattern-matches-nothing": Case(prune(*RANDOM, "--ratios", "nosuch*:0.5"), ("matches no",), early=False),
    "ratio-stage-list-length": Case(prune(*RANDOM, "--ratios", "[0,0.5,0]"), ("entries",), early=False),
    "speedup-below-one": Case(prune(*RANDOM, "--speedup", "0.5"), ("speedup", ">= 1")),
    "speedup-nan": Case(prune(*RANDOM, "--speedup", "nan"), ("finite",)),
    "target-macs-above-one": Case(prune(*RANDOM, "--target-macs", "1.5"), ("(0, 1]",)),
    "target-macs-zero": Case(prune(*RANDOM, "--target-macs", "0"), ("(0, 1]",)),
    "speedup-and-target-macs": Case(prune(*RANDOM, "--speedup", "2", "--target-macs", "0.5"), ("not both",)),
    "no-amount-to-prune": Case(prune(*RANDOM), ("say how much",)),
    # names
    "unknown-model": Case(lambda a, t: ["prune", "--model", "resnet9000", "--data", "digits", *RANDOM, "--speedup",
                                        "2", "--out", t / "run"], ("unknown model",)),
    "unknown-dataset": Case(prune(*RANDOM, "--speedup", "2", "--data", "imagenet22k"), ("unknown dataset",),
                            early=False),
    "unknown-method": Case(prune(*RANDOM, "--speedup", "2", "--method", "magic"), ("invalid choice",)),
    # data folders and files
    "cifar-missing-folder": Case(prune(*RANDOM, "--speedup", "2", "--data", "cifar10:/nonexistent/cifar"),
                                 ("not found",), early=False),
    "cifar-garbage-batch": Case(prune(*RANDOM, "--speedup", "2", "--data", "cifar10:{a}/cifar_garbage"),
                                ("data_batch_1",), early=False),
    "cifar-truncated-batch": Case(prune(*RANDOM, "--speedup", "2", "--data", "cifar10:{a}/cifar_truncated"),
                                  ("data_batch_1",), early=False),
    # model files
    "base-truncated": Case(prune("--base", "{a}/truncated.safetensors", "--speedup", "2"),
                           ("not a readable safetensors",), early=False),
    "base-mismatched": Case(prune("--base", "{a}/mismatched.safetensors", "--speedup", "2"),
                            ("conv1.weight", "fc.bias"), early=False),
    "base-pickle-payload": Case(prune("--base", "{a}/evil_zip.pt", "--speedup", "2"), ("pickle",), early=False,
                                markers=("PWNED_zip",)),
    "eval-truncated": Case(lambda a, t: ["eval", a / "truncated.safetensors", "--data", "digits"],
                           ("not a readable safetensors",)),
    "eval-mismatched": Case(lambda a, t: ["eval", a / "mismatched.safetensors", "--data", "digits"],
                            ("conv1.weight", "(8, 1, 3, 3)", "fc.bias")),
    "eval-pickle-payload": Case(lambda a, t: ["eval", a / "evil_p2.safetensors", "--data", "digits"], ("pickle",),
                                markers=("PWNED_p2",)),
    "eval-text-pickle-payload": Case(lambda a, t: ["eval", a / "evil_p0.safetensors", "--data", "digits"],
                                     ("not a readable safetensors",), markers=("PWNED_p0",)),
    "eval-missing-file": Case(lambda a, t: ["eval", t / "nothing.safetensors"], ("does not exist",)),
    # where the run goes
    # (the last --out wins, as with any repeated option)
    "out-under-a-regular-file": Case(prune(*RANDOM, "--speedup", "2", "--out", "{a}/a_file/run"), ("cannot write",)),
    "out-under-proc": Case(prune(*RANDOM, "--speedup", "2", "--out", "/proc/regprune/run"), ("cannot write",)),
    "existing-run-without-overwrite": Case(prune(*RANDOM, "--speedup", "2"), ("already exists", "--overwrite"),
                                           setup=_existing_run),
    "resume-not-a-run": Case(lambda a, t: ["prune", "--resume", t / "notarun"], ("no regprune run",),
                             setup=_not_a_run),
    "resume-corrupt-options": Case(lambda a, t: ["prune", "--resume", t / "broken"], ("unreadable",),
                                   setup=_corrupt_options),
    "resume-corrupt-state": Case(lambda a, t: ["prune", "--resume", t / "broken", "--no-progress"],
                                 ("state.json",), setup=_corrupt_state),
    # the base to prune
    "no-base": Case(prune("--speedup", "2"), ("--base random",)),
    "pretrained-not-torchvision": Case(prune("--base", "pretrained", "--speedup", "2"), ("torchvision",)),
    # GReg settings
    "greg-without-equals": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg1", "--greg", "fast"),
                                ("NAME=VALUE",)),
    "greg-unknown-setting": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg1", "--greg", "warp_speed=9"),
                                 ("unknown GReg setting", "warp_speed", "known: ")),
    "greg-bad-value": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg2", "--greg", "update_reg_interval=0"),
                           ("update_reg_interval",)),
    "sparsity-without-unstructured": Case(prune(*RANDOM, "--method", "greg1", "--sparsity", "0.8"),
                                          ("--sparsity is the unstructured scope",)),
    "sparsity-and-speedup": Case(prune(*RANDOM, "--method", "greg1", "--unstructured", "--sparsity", "0.8",
                                       "--speedup", "2"), ("not both",)),
    "sparsity-and-ratios": Case(prune(*RANDOM, "--method", "greg1", "--unstructured", "--sparsity", "0.8",
                                      "--ratios", "0.5"), ("not both",)),
    "sparsity-and-ratios-dry-run": Case(prune("--method", "greg1", "--unstructured", "--sparsity", "0.8", "--ratios",
                                              "0.5", "--dry-run"), ("not both",)),
    "sparsity-and-round-to": Case(prune(*RANDOM, "--method", "greg1", "--unstructured", "--sparsity", "0.8",
                                        "--round-to", "8"), ("--round-to", "filter plans")),
    "sparsity-and-include-coupled-dry-run": Case(prune("--method", "greg1", "--unstructured", "--sparsity", "0.8",
                                                       "--include-coupled", "--dry-run"),
                                                 ("--include-coupled", "filter plans")),
    "l1-unstructured-dry-run": Case(prune("--unstructured", "--sparsity", "0.999", "--dry-run"),
                                    ("greg1 and greg2",)),
    "l1-penalty-group": Case(prune(*RANDOM, "--speedup", "2", "--penalty", "group"),
                             ("--penalty group", "no regularization phase")),
    "l1-greg-setting-dry-run": Case(prune("--speedup", "2", "--greg", "update_reg_interval=5", "--dry-run"),
                                    ("--greg", "no regularization phase")),
    "l1-reg-iters": Case(prune(*RANDOM, "--speedup", "2", "--reg-iters", "100"), ("--reg-iters", "GReg option")),
    "l1-reg-batch-size": Case(prune(*RANDOM, "--speedup", "2", "--reg-batch-size", "32"),
                              ("--reg-batch-size", "GReg option")),
    "greg-momentum-not-the-optimizers": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg1", "--greg",
                                                   "momentum=0.5"), ("--momentum",)),
    "greg-momentum-not-the-optimizers-dry-run": Case(prune("--speedup", "2", "--method", "greg2", "--reg-iters", "500",
                                                           "--greg", "momentum=0.5", "--dry-run"), ("--momentum",)),
    "greg-lr-not-a-setting": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg1", "--greg", "lr=0.01"),
                                  ("lr_prune",)),
    "bn-recal-negative": Case(prune(*RANDOM, "--speedup", "2", "--bn-recal", "-1"), ("--bn-recal must be >= 0",)),
    "penalty-unknown": Case(prune(*RANDOM, "--speedup", "2", "--method", "greg1", "--penalty", "everything"),
                            ("invalid choice",)),
    # recipes
    "recipe-bad-yaml": Case(prune(*RANDOM, "--recipe", "{a}/bad_syntax.yaml"), ("not valid YAML",)),
    "recipe-python-tag": Case(prune(*RANDOM, "--recipe", "{a}/python_tag.yaml"), ("python/object/apply",),
                              markers=("PWNED_yaml",)),
    "recipe-not-a-mapping": Case(prune(*RANDOM, "--recipe", "{a}/list.yaml"), ("mapping",)),
    "recipe-unknown-option": Case(prune(*RANDOM, "--recipe", "{a}/unknown_key.yaml"), ("frobnicate",)),
    "recipe-wrong-type": Case(prune(*RANDOM, "--recipe", "{a}/wrong_type.yaml"), ("speedup", "'fast'")),
    # learning-rate schedules and training numbers
    "ft-lr-schedule-unknown": Case(prune(*RANDOM, "--speedup", "2", "--ft-lr-schedule", "exponential"),
                                   ("unknown lr schedule",)),
    "ft-lr-schedule-not-increasing": Case(prune(*RANDOM, "--speedup", "2", "--ft-lr-schedule", "0:0.1,5:0.01,3:0.001"),
                                          ("increasing",)),
    "train-lr-schedule-not-a-number": Case(train("--lr-schedule", "0:0.1,10:tiny"), ("not a number",)),
    "train-negative-lr": Case(train("--lr", "-1"), ("lr must be >= 0",)),
    "train-zero-batch-size": Case(train("--batch-size", "0"), ("batch_size",)),
}


SUBPROCESS_SAMPLE = [n for n in CASES if any(k in n for k in ("pickle", "exists", "yaml", "recipe"))][:4]


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_bad_input_in_a_real_process(name, assets, tmp_path):
    _check_case(name, assets, tmp_path, subprocess_run=True)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(name, assets, tmp_path):
    _check_case(name, assets, tmp_path)


def _check_case(name, assets, tmp_path, subprocess_run: bool = False):
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path)
    argv = case.args(assets, tmp_path)
    outs = [Path(argv[i + 1]) for i, x in enumerate(argv) if x == "--out"]
    out = outs[-1] if outs else None
    before = snapshot(assets, tmp_path)

    proc = run_cli(*argv, subprocess_run=subprocess_run)

    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("regprune: error:"), proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    for text in case.expect:
        assert text in lines[0], (text, lines[0])
    for marker in case.markers:
        assert not (assets / marker).exists(), f"the payload ran: {marker} was created"
    after = snapshot(assets, tmp_path)
    changed = [p for p in before if after.get(p) != before[p] and not (out is not None and p == str(out.parent))]
    assert not changed, f"existing files changed: {changed}"
    created = [p for p in after if p not in before]
    if case.early or out is None:
        assert not created, f"created {created}"
    else:
        assert all(Path(p) == out or out in Path(p).parents for p in created), f"created outside the run: {created}"
