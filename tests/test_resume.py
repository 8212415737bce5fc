"""Killed, interrupted and diverging runs: resuming reproduces an uninterrupted run bit for bit.

The runs are real `regprune` subprocesses on a tiny setup (resnet20 on sklearn's digits, a random base,
GReg-1 scaled to 40 iterations, 2 fine-tuning epochs, a checkpoint every 5 steps). One uninterrupted run is
the reference; the others are killed (SIGKILL) or interrupted (SIGINT) while a phase is running, resumed with
`--resume`, and their final model.safetensors must hold exactly the reference's tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from regprune.engine import CHECKPOINT_FORMAT, TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
PRUNE = ["prune", "--model", "resnet20", "--data", "digits", "--base", "random", "--method", "greg1", "--speedup", "2",
         "--reg-iters", "40", "--ft-epochs", "2", "--batch-size", "64", "--checkpoint-every", "5", "--seed", "3",
         "--no-progress"]


def _default_sigint() -> None:
    # a background parent (CI, `cmd &`) may ignore SIGINT; Python turns it into KeyboardInterrupt only if not ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regprune", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_default_sigint)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regprune", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until `path` exists (checkpoints are renamed into place, so existing means complete)."""
    t_end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (status {proc.returncode}) before {path.name} appeared:\n{err[-3000:]}")
        if time.monotonic() > t_end:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def done_phases(run: Path) -> list[str]:
    return json.loads((run / "state.json").read_text())["done"]


def assert_same_model(run: Path, reference: Path) -> None:
    got, want = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"
    assert (run / "picks.json").read_text() == (reference / "picks.json").read_text()


def _messages(stderr: str) -> list[str]:
    """stderr's lines without the schedule warning a deliberately short GReg budget prints when a run starts."""
    return [line for line in stderr.splitlines() if not line.startswith("warning: the schedule integrates")]


def resume_ok(run: Path) -> None:
    proc = cli("prune", "--resume", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert done_phases(run)[-1] == "finetune"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = cli(*PRUNE, "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------------------------- SIGKILL / SIGINT
def kill_when(run: Path, phase: str, proc: subprocess.Popen) -> None:
    """SIGKILL `proc` as soon as `phase` has written its first checkpoint."""
    wait_for(run / "checkpoints" / f"{phase}.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert phase not in done_phases(run), f"{phase} finished before the kill: nothing was tested"
    assert not (run / "model.safetensors").exists()


@pytest.mark.slow
def test_sigkill_during_regularization_then_resume_is_bit_exact(reference, tmp_path):
    run = tmp_path / "run"
    kill_when(run, "regularize", start(*PRUNE, "--out", run))
    resume_ok(run)
    assert_same_model(run, reference)


@pytest.mark.slow
def test_ctrl_c_then_sigkill_during_finetuning_then_resume_is_bit_exact(reference, tmp_path):
    """Ctrl-C in regularization saves a checkpoint and exits with one line; --resume goes on from it; a SIGKILL
    in fine-tuning and a second --resume still end on the uninterrupted run's exact weights."""
    run = tmp_path / "run"
    proc = start(*PRUNE, "--out", run)
    wait_for(run / "checkpoints" / "regularize.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = _messages(err)
    assert len(lines) == 1 and lines[0].startswith("regprune: interrupted at step"), err
    assert "--resume" in lines[0]
    ckpt = torch.load(run / "checkpoints" / "regularize.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and f"at step {ckpt['step']};" in lines[0]
    assert "regularize" not in done_phases(run)

    kill_when(run, "finetune", start("prune", "--resume", run))
    assert "regularize" in done_phases(run)
    resume_ok(run)
    assert_same_model(run, reference)


# ---------------------------------------------------------------------------------------------- divergence
@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    # one sane epoch (23 steps), then an absurd rate: the loss overflows early in epoch 2
    proc = cli("train", "--model", "resnet20", "--data", "digits", "--batch-size", "64", "--epochs", "2",
               "--lr-schedule", "0:0.05,1:1e30", "--checkpoint-every", "5", "--no-progress", "--out", run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _messages(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("regprune: error: training diverged at step"), proc.stderr
    assert "last good checkpoint" in lines[0]
    ckpt = torch.load(run / "checkpoints" / "train.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 23 and f"(step {ckpt['step']})" in lines[0]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (run / "model.safetensors").exists()
    assert "train" not in done_phases(run)


# ---------------------------------------------------------------------------------------------- hostile files
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.slow
def test_resume_refuses_a_hostile_checkpoint_without_running_it(reference, tmp_path):
    """checkpoints/*.pt replaced by a pickle with a payload: --resume refuses it, and the payload never runs."""
    target, done = "checkpoints/regularize.pt", ["base", "plan"]
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    state = json.loads((run / "state.json").read_text())
    state["done"] = done
    (run / "state.json").write_text(json.dumps(state))
    marker = tmp_path / "PWNED"
    with open(run / target, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, "phase": "regularize", "model": _Payload(marker)}, f)
    hostile = (run / target).read_bytes()
    proc = cli("prune", "--resume", run)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _messages(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("regprune: error: refusing to load"), proc.stderr
    assert not marker.exists(), "the pickle's payload ran"
    assert (run / target).read_bytes() == hostile


# ---------------------------------------------------------------------------------------------- the trainer alone
class _StopAfter:
    """A hook that asks to stop after `n` steps (state-based, like GReg's should_stop)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_step_end(self, trainer) -> None:
        self.seen += 1

    def should_stop(self, trainer) -> bool:
        return self.seen >= self.n

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])


def _tiny_trainer(run_dir: Path) -> Trainer:
    torch.manual_seed(0)
    x = torch.randn(24, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, shuffle=True)
    return Trainer(torch.nn.Linear(4, 2), loader, None,
                   TrainConfig(max_steps=10, lr=0.1, device="cpu", progress=False), run_dir=run_dir,
                   hooks=[_StopAfter(3)])


def test_resume_from_the_stopping_step_takes_no_extra_step(tmp_path):
    ref = _tiny_trainer(tmp_path)
    ref.fit()
    assert ref.step == 3  # the hook stopped it at an epoch end; that checkpoint is the phase's last
    again = _tiny_trainer(tmp_path)
    again.fit(resume_from=tmp_path / "checkpoints" / "train.pt")
    assert again.step == 3
    assert torch.equal(again.model.weight, ref.model.weight) and torch.equal(again.model.bias, ref.model.bias)
