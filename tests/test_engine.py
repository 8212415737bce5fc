"""Tests of the training engine: schedules, parameter groups, the loop, hooks, checkpoints, resume, safety."""

from __future__ import annotations

import copy
import json
import math
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from regprune.engine import (CHECKPOINT_FORMAT, TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted,
                             atomic_save, atomic_write_bytes, build_param_groups, evaluate, parse_lr_schedule,
                             read_metrics, safe_load)
from regprune.errors import UserError

TIMING_KEYS = {"img_s", "time_s"}


# ---------------------------------------------------------------- fixtures
def toy_dataset(n: int = 160, seed: int = 0) -> TensorDataset:
    """1x8x8 noise images with one brightened quadrant; the label is that quadrant (4 classes, learnable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g)
    for q in range(4):
        rows = slice(0, 4) if q < 2 else slice(4, 8)
        cols = slice(0, 4) if q % 2 == 0 else slice(4, 8)
        x[y == q, 0, rows, cols] += 1.0
    return TensorDataset(x, y)


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.1, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(dropout)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(8 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(torch.flatten(x, 1)))


def make_model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def loaders(n: int = 160, batch: int = 16, generator: bool = True) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(toy_dataset(n, 0), batch_size=batch, shuffle=True,
                       generator=torch.Generator() if generator else None)
    test = DataLoader(toy_dataset(64, 1), batch_size=32)
    return train, test


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, lr=0.05, weight_decay=0.0, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(autouse=True)
def _one_thread():
    # the suite shares two cores with other jobs; one thread avoids OpenMP spin contention
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- schedules
def test_step_schedule_values_per_epoch():
    f = parse_lr_schedule("0:0.1,100:0.01,150:0.001", lr=123.0)
    assert f(0) == 0.1 and f(99.999) == 0.1
    assert f(100) == 0.01 and f(149.5) == 0.01
    assert f(150) == 0.001 and f(10_000) == 0.001
    assert parse_lr_schedule(" 0 : 0.2 , 1.5:1e-3 ")(1.4) == 0.2


def test_cosine_with_warmup_endpoints():
    f = parse_lr_schedule("cosine", lr=0.2, total_epochs=10, warmup_epochs=2)
    assert f(0) == 0.0
    assert f(1) == pytest.approx(0.1)
    assert f(2) == pytest.approx(0.2)
    assert f(6) == pytest.approx(0.1)
    assert abs(f(10)) < 1e-12 and abs(f(12)) < 1e-12
    assert parse_lr_schedule("cosine", lr=0.2, total_epochs=10)(0) == pytest.approx(0.2)
    assert parse_lr_schedule("constant", lr=0.3)(57.5) == 0.3
    assert parse_lr_schedule("constant", lr=0.3, warmup_epochs=1)(0.5) == pytest.approx(0.15)


@pytest.mark.parametrize("spec, fragment", [
    ("0:0.1,abc", "not EPOCH:LR"),
    ("0:0.1,10:x", "not a number"),
    ("0:0.1,10:-0.01", "negative learning rate"),
    ("0:0.1,20:0.01,10:0.001", "strictly increasing"),
    ("0:0.1,10:0.01,10:0.001", "strictly increasing"),
    ("10:0.1,20:0.01", "epoch 0"),
    ("0:0.1,", "empty entry"),
    ("0:0.1,5:nan", "not finite"),
    ("", "empty"),
    ("linear", "unknown lr schedule"),
])
def test_schedule_errors_are_one_line_user_errors(spec, fragment):
    with pytest.raises(UserError) as info:
        parse_lr_schedule(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cosine_needs_run_length_and_config_is_validated():
    with pytest.raises(UserError):
        parse_lr_schedule("cosine", lr=0.1)
    train, test = loaders()
    for bad in (dict(momentum=1.5), dict(nesterov=True, momentum=0.0), dict(lr_schedule="0:0.1,abc"),
                dict(label_smoothing=1.0), dict(device="tpu9")):
        with pytest.raises(UserError):
            Trainer(make_model(), train, test, cfg(**bad))


def test_trainer_applies_step_schedule_per_epoch():
    train, _ = loaders()  # 10 batches per epoch
    seen = []

    class Spy:
        def on_step_start(self, trainer):
            seen.append((trainer.epoch, trainer.lr))

    Trainer(make_model(), train, None, cfg(epochs=3, lr_schedule="0:0.3,1:0.2,2:0.1"), hooks=[Spy()]).fit()
    assert [lr for e, lr in seen if e == 0] == [0.3] * 10
    assert [lr for e, lr in seen if e == 1] == [0.2] * 10
    assert [lr for e, lr in seen if e == 2] == [0.1] * 10


def test_rates_go_through_a_lambdalr_per_step_and_resume_at_the_same_rate(tmp_path):
    from torch.optim.lr_scheduler import LambdaLR

    train, _ = loaders()  # 10 batches per epoch
    model = make_model()
    seen = []

    class Spy:
        def on_step_start(self, trainer):
            seen.append((trainer.lr, [g["lr"] for g in trainer.optimizer.param_groups]))

    class StopAt7(Spy):
        def should_stop(self, trainer):
            return trainer.step == 7

    config = cfg(epochs=2, lr=0.2, lr_schedule="cosine", warmup_epochs=0.5)
    t = Trainer(model, train, None, config, run_dir=tmp_path, hooks=[StopAt7()],
                extra_param_groups=[{"params": [model.fc.weight], "lr_scale": 0.1}])
    t.fit()
    assert isinstance(t.lr_scheduler, LambdaLR) and t.lr_scheduler.last_epoch == 7
    sched = parse_lr_schedule("cosine", lr=0.2, total_epochs=2, warmup_epochs=0.5)
    want = [sched(i // 10 + (i % 10) / 10 + 0.5 / 10) for i in range(20)]  # mid-step epochs
    assert [lr for lr, _ in seen] == want[:7]
    assert all(groups == [lr, lr * 0.1] for lr, groups in seen)
    # a new trainer resuming the checkpoint continues the same per-step rates
    model2 = make_model()
    t2 = Trainer(model2, train, None, cfg(epochs=2, lr=0.2, lr_schedule="cosine", warmup_epochs=0.5),
                 run_dir=tmp_path, hooks=[Spy()], extra_param_groups=[{"params": [model2.fc.weight], "lr_scale": 0.1}])
    t2.fit(resume_from=tmp_path / "checkpoints" / "train.pt")
    assert [lr for lr, _ in seen[7:]] == want[7:] and t2.step == 20


def test_build_lr_scheduler_uses_lr_scale_as_base_rate():
    from regprune.engine import build_lr_scheduler

    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr_scale": 0.5}], lr=1.0)
    sched = build_lr_scheduler(opt, parse_lr_schedule("0:0.4,1:0.2"), steps_per_epoch=4, position=3)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.2]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1] and sched.last_epoch == 4
    with pytest.raises(ValueError):
        build_lr_scheduler(opt, parse_lr_schedule("constant"), steps_per_epoch=0)


# ---------------------------------------------------------------- parameter groups
def test_no_wd_groups_for_norm_params_and_biases():
    model = make_model()
    groups = build_param_groups(model, 5e-4, no_wd_bn_bias=True)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(model.conv.weight)] == 5e-4 and wd[id(model.fc.weight)] == 5e-4
    for p in (model.conv.bias, model.fc.bias, model.bn.weight, model.bn.bias):
        assert wd[id(p)] == 0.0
    plain = build_param_groups(model, 5e-4)
    assert all(g["weight_decay"] == 5e-4 for g in plain)
    assert sum(len(g["params"]) for g in plain) == len(list(model.parameters()))


def test_hook_no_wd_params_and_extra_groups_reach_the_optimizer():
    model = make_model()

    class NoWd:
        def no_weight_decay_params(self):
            return [model.conv.weight]

    train, _ = loaders()
    t = Trainer(model, train, None, cfg(weight_decay=1e-3), hooks=[NoWd()],
                extra_param_groups=[{"params": [model.fc.weight], "weight_decay": 0.5, "lr_scale": 0.1}])
    wd = {id(p): g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
    assert wd[id(model.conv.weight)] == 0.0
    assert wd[id(model.fc.weight)] == 0.5
    assert wd[id(model.bn.weight)] == 1e-3
    assert sum(len(g["params"]) for g in t.optimizer.param_groups) == len(list(model.parameters()))
    t.config.max_steps = 1
    t.fit()
    extra = [g for g in t.optimizer.param_groups if "lr_scale" in g][0]
    assert extra["lr"] == pytest.approx(0.05 * 0.1)


# ---------------------------------------------------------------- the loop
def test_label_smoothing_changes_the_loss():
    train, _ = loaders()
    losses = []
    for ls in (0.0, 0.2):
        t = Trainer(make_model(dropout=0.0), train, None, cfg(max_steps=1, lr=0.0, label_smoothing=ls))
        t.fit()
        losses.append(t.last_loss)
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] != pytest.approx(losses[1], abs=1e-4)


def test_tiny_model_learns_toy_problem():
    train = DataLoader(toy_dataset(512, 0), batch_size=32, shuffle=True)
    test = DataLoader(toy_dataset(256, 1), batch_size=128)
    t = Trainer(make_model(dropout=0.0), train, test,
                cfg(epochs=10, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0.5))
    summary = t.fit()
    assert summary["eval"]["top1"] >= 90.0, summary
    assert "top5" not in summary["eval"]  # only 4 classes
    assert summary["step"] == 160 and summary["epoch"] == 10.0


class Recorder:
    """Hook with every method; records the call order and what after_backward sees."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[str] = []
        self.checks: list[tuple[bool, bool]] = []
        self._before = None

    def on_step_start(self, trainer):
        self.calls.append("on_step_start")
        self._before = self.model.fc.weight.detach().clone()

    def extra_loss(self, trainer, model, outputs):
        assert model is self.model and outputs.requires_grad
        self.calls.append("extra_loss")
        return None

    def after_backward(self, trainer):
        self.calls.append("after_backward")
        has_grad = self.model.fc.weight.grad is not None and bool(self.model.fc.weight.grad.abs().sum() > 0)
        unchanged = torch.equal(self.model.fc.weight.detach(), self._before)
        self.checks.append((has_grad, unchanged))

    def on_step_end(self, trainer):
        self.calls.append("on_step_end")
        assert not torch.equal(self.model.fc.weight.detach(), self._before)

    def should_stop(self, trainer):
        self.calls.append("should_stop")
        return False


def test_hooks_are_called_in_order_and_see_gradients_before_the_step():
    model = make_model()
    rec = Recorder(model)
    train, _ = loaders()
    Trainer(model, train, None, cfg(max_steps=3), hooks=[rec]).fit()
    assert rec.calls == ["on_step_start", "extra_loss", "after_backward", "on_step_end", "should_stop"] * 3
    assert rec.checks == [(True, True)] * 3


def test_hook_zeroing_gradients_freezes_the_weights():
    class ZeroGrads:
        def after_backward(self, trainer):
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    model = make_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    train, _ = loaders()
    Trainer(model, train, None, cfg(max_steps=5, momentum=0.0, weight_decay=0.0), hooks=[ZeroGrads()]).fit()
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]), k


def test_extra_loss_is_added_to_the_loss():
    class Plus:
        def extra_loss(self, trainer, model, outputs):
            return torch.tensor(100.0)

    train, _ = loaders()
    a = Trainer(make_model(dropout=0.0), train, None, cfg(max_steps=1, lr=0.0))
    a.fit()
    b = Trainer(make_model(dropout=0.0), train, None, cfg(max_steps=1, lr=0.0), hooks=[Plus()])
    b.fit()
    assert b.last_loss == pytest.approx(a.last_loss + 100.0, rel=1e-5)


def test_should_stop_ends_training():
    class StopAt:
        def should_stop(self, trainer):
            return trainer.step >= 4

    train, _ = loaders()
    t = Trainer(make_model(), train, None, cfg(epochs=5), hooks=[StopAt()])
    summary = t.fit()
    assert t.step == 4 and summary["stopped_early"] is True


def test_max_steps_and_fractional_epochs():
    train, _ = loaders()  # 10 batches per epoch
    t = Trainer(make_model(), train, None, cfg(epochs=100, max_steps=13))
    t.fit()
    assert t.step == 13 and t.epoch == 1 and t.batch_in_epoch == 3
    t2 = Trainer(make_model(), train, None, cfg(epochs=1.5))
    t2.fit()
    assert t2.step == 15 and t2.epoch_float == 1.5


# ---------------------------------------------------------------- checkpoints and resume
class Counter:
    """Stateful hook: its state must survive a resume."""

    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, trainer):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = int(state["n"])


RESUME_CFG = dict(epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", warmup_epochs=0.5,
                  log_every=4, label_smoothing=0.1)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run: final weights, hook count and metrics."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("ref")
        train, test = loaders()
        model = make_model()
        counter = Counter()
        Trainer(model, train, test, cfg(**RESUME_CFG), run_dir=run_dir, hooks=[counter]).fit()
    finally:
        torch.set_num_threads(old)
    return params_of(model), counter.n, strip_timing(read_metrics(run_dir / "metrics.jsonl"))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_ctrl_c_mid_epoch_then_resume_is_bit_identical(tmp_path, reference_run):
    ref_params, ref_count, ref_metrics = reference_run

    class CtrlC:
        def on_step_end(self, trainer):
            if trainer.step == 13:  # epoch 1, batch 3 of 10
                signal.raise_signal(signal.SIGINT)

    train, test = loaders()
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(make_model(), train, test, cfg(**RESUME_CFG), run_dir=tmp_path, hooks=[Counter(), CtrlC()]).fit()
    path = info.value.checkpoint
    assert path == tmp_path / "checkpoints" / "train.pt" and info.value.step == 13
    state = safe_load(path)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (13, 1, 3)

    # a fresh process would rebuild everything: new model (other init), new loaders, new hooks
    train, test = loaders()
    model = make_model(seed=123)
    counter = Counter()
    Trainer(model, train, test, cfg(**RESUME_CFG), run_dir=tmp_path, hooks=[counter, CtrlC()]).fit(resume_from=path)
    assert_same_state(params_of(model), ref_params)
    assert counter.n == ref_count
    assert strip_timing(read_metrics(tmp_path / "metrics.jsonl")) == ref_metrics


def test_crash_after_periodic_checkpoint_then_resume_matches(tmp_path, reference_run):
    ref_params, _, ref_metrics = reference_run

    class Crash:
        def on_step_start(self, trainer):
            if trainer.step == 9:
                raise RuntimeError("simulated crash")

    # no explicit generator: the trainer must still make the order depend on (seed, epoch) only
    train, test = loaders(generator=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(make_model(), train, test, cfg(**RESUME_CFG, checkpoint_every=6), run_dir=tmp_path,
                hooks=[Counter(), Crash()]).fit()
    ckpt = tmp_path / "checkpoints" / "train.pt"
    assert safe_load(ckpt)["step"] == 6
    # the interval record at step 8 was written after the checkpoint; resume must drop it, not duplicate it
    assert any(r["step"] == 8 for r in read_metrics(tmp_path / "metrics.jsonl"))

    train, test = loaders(generator=False)
    model = make_model(seed=7)
    trainer = Trainer(model, train, test, cfg(**RESUME_CFG, checkpoint_every=6), run_dir=tmp_path, hooks=[Counter()])
    trainer.fit(resume_from=ckpt)
    assert_same_state(params_of(model), ref_params)
    assert strip_timing(read_metrics(tmp_path / "metrics.jsonl")) == ref_metrics


def test_interrupt_inside_a_step_saves_the_state_before_it(tmp_path):
    class Boom:
        def after_backward(self, trainer):
            if trainer.step == 4:  # while computing the 5th step
                raise KeyboardInterrupt

    train, _ = loaders()
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(make_model(), train, None, cfg(epochs=2), run_dir=tmp_path, hooks=[Boom()]).fit()
    assert info.value.step == 4
    assert safe_load(info.value.checkpoint)["step"] == 4
    assert "resume_from" in str(info.value)


def test_loader_failure_after_ctrl_c_counts_as_the_interrupt(tmp_path):
    # Ctrl-C also kills DataLoader workers; the resulting loader error must not lose the checkpoint
    class CtrlCThenDeadWorkers:
        def on_step_end(self, trainer):
            if trainer.step == 3:
                signal.raise_signal(signal.SIGINT)
                raise RuntimeError("DataLoader worker (pid 1234) exited unexpectedly")

    train, _ = loaders()
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(make_model(), train, None, cfg(epochs=1), run_dir=tmp_path, hooks=[CtrlCThenDeadWorkers()]).fit()
    assert info.value.step == 3 and safe_load(info.value.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_hook_state_mismatch_on_resume_is_a_user_error(tmp_path):
    train, _ = loaders()
    t = Trainer(make_model(), train, None, cfg(max_steps=2), run_dir=tmp_path, hooks=[Counter()])
    t.fit()
    t2 = Trainer(make_model(), train, None, cfg(max_steps=4), run_dir=tmp_path,
                 hooks=[Recorder(make_model()), Counter()])
    with pytest.raises(UserError, match="hook"):
        t2.fit(resume_from=t.checkpoint_path)
    with pytest.raises(UserError, match="phase"):
        Trainer(make_model(), train, None, cfg(), phase="finetune").load_checkpoint(t.checkpoint_path)


def test_periodic_and_epoch_checkpoints(tmp_path):
    train, _ = loaders()
    seen = []

    class Watch:
        def on_step_end(self, trainer):
            path = trainer.checkpoint_path
            if path.exists():
                seen.append((trainer.step, safe_load(path)["step"]))

    Trainer(make_model(), train, None, cfg(epochs=2, checkpoint_every=4), run_dir=tmp_path, hooks=[Watch()]).fit()
    saved_steps = sorted({s for _, s in seen})
    assert saved_steps == [4, 8, 10, 12, 16]
    assert safe_load(tmp_path / "checkpoints" / "train.pt")["step"] == 20
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "train.pt"]  # no temp files left


def test_nan_loss_raises_diverged_and_keeps_last_good_checkpoint(tmp_path):
    class Poison:
        def on_step_start(self, trainer):
            if trainer.step == 6:
                with torch.no_grad():
                    trainer.model.fc.weight.fill_(float("nan"))

    train, _ = loaders()
    with pytest.raises(TrainingDiverged) as info:
        Trainer(make_model(), train, None, cfg(epochs=2, checkpoint_every=4), run_dir=tmp_path, hooks=[Poison()]).fit()
    msg = str(info.value)
    assert "step 7" in msg and "kept" in msg and "\n" not in msg
    assert isinstance(info.value, UserError)
    state = safe_load(tmp_path / "checkpoints" / "train.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_from_extra_loss_without_run_dir():
    class Bad:
        def extra_loss(self, trainer, model, outputs):
            return torch.tensor(float("inf")) if trainer.step == 2 else None

    train, _ = loaders()
    with pytest.raises(TrainingDiverged, match="step 3"):
        Trainer(make_model(), train, None, cfg(epochs=1), hooks=[Bad()]).fit()


# ---------------------------------------------------------------- evaluation and metrics
class Lookup(nn.Module):
    """Returns a fixed row of logits per sample; the input holds the row index."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_evaluate_top1_top5_on_known_logits():
    # 6 classes; the target's rank among the logits is known for every sample
    table = torch.tensor([
        [9., 1, 2, 3, 4, 5],   # target 0: rank 1
        [1., 9, 2, 3, 4, 5],   # target 0: rank 6 (miss top5)
        [1., 2, 9, 3, 4, 5],   # target 5: rank 2 (top5 hit)
        [5., 4, 3, 2, 1, 0],   # target 4: rank 5 (top5 hit)
        [0., 0.5, 1, 2, 3, 8],  # target 5: rank 1
    ])
    targets = torch.tensor([0, 0, 5, 4, 5])
    ds = TensorDataset(torch.arange(5, dtype=torch.float32).view(5, 1), targets)
    res = evaluate(Lookup(table), DataLoader(ds, batch_size=2), "cpu")
    assert res["n"] == 5
    assert res["top1"] == pytest.approx(40.0)
    assert res["top5"] == pytest.approx(80.0)
    assert res["loss"] == pytest.approx(F.cross_entropy(table, targets).item(), rel=1e-6)
    three = evaluate(Lookup(table[:, :3]), DataLoader(TensorDataset(ds.tensors[0], torch.tensor([0, 1, 2, 0, 1])),
                                                       batch_size=4), "cpu")
    assert "top5" not in three and three["top1"] == pytest.approx(80.0)


def test_metrics_jsonl_records(tmp_path):
    train, test = loaders()

    class Extra:
        def on_step_end(self, trainer):
            if trainer.step == 3:
                trainer.log({"kind": "custom", "value": torch.tensor(1.5)})

    Trainer(make_model(), train, test, cfg(epochs=2, log_every=5), run_dir=tmp_path, hooks=[Extra()]).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["custom", "interval", "interval", "epoch", "interval", "interval", "epoch", "final"]
    for r in records:
        assert r["phase"] == "train" and isinstance(r["step"], int) and "epoch" in r
    interval = records[1]
    for key in ("loss", "train_top1", "lr", "img_s"):
        assert isinstance(interval[key], float)
    epoch = records[3]
    assert epoch["step"] == 10 and epoch["epoch"] == 1.0
    assert 0 <= epoch["test_top1"] <= 100 and epoch["test_n"] == 64 and "test_loss" in epoch
    assert records[0]["value"] == 1.5


# ---------------------------------------------------------------- file safety
class Payload:
    """Unpickling this would create `marker`: the stand-in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "phase": "train", "model": Payload(str(marker))}, bad)
    train, _ = loaders()
    t = Trainer(make_model(), train, None, cfg())
    with pytest.raises(UserError, match="refusing"):
        t.load_checkpoint(bad)
    with pytest.raises(UserError):
        t.fit(resume_from=bad)
    assert not marker.exists()


def test_atomic_helpers_and_unreadable_files(tmp_path):
    target = tmp_path / "sub" / "blob.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_save({"w": torch.arange(3), "meta": {"a": [1, 2.5, "x", None]}}, tmp_path / "obj.pt")
    loaded = safe_load(tmp_path / "obj.pt")
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["meta"] == {"a": [1, 2.5, "x", None]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blob.bin", "obj.pt", "sub"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        safe_load(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="does not exist"):
        safe_load(tmp_path / "missing.pt")


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from regprune.io import atomic_path

    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass  # the writer wrote nothing
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    with atomic_path(target) as tmp:
        assert tmp.name == "model.bin" and tmp.parent != tmp_path
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_torchrun_env_is_read_in_one_place(monkeypatch):
    from regprune.engine import get_local_rank, init_distributed, torchrun_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() == (None, None, 0) and init_distributed() == (0, 1, 0) and get_local_rank() == 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_env() == (0, 1, 0) and init_distributed() == (0, 1, 0)


def test_unsafe_hook_state_is_rejected_at_save_time(tmp_path):
    class Sneaky:
        def state_dict(self):
            return {"obj": object()}

        def load_state_dict(self, state):
            pass

    train, _ = loaders()
    with pytest.raises(TypeError, match="cannot be stored"):
        Trainer(make_model(), train, None, cfg(max_steps=1), run_dir=tmp_path, hooks=[Sneaky()]).fit()
    assert not (tmp_path / "checkpoints" / "train.pt").exists()


def test_two_phases_share_a_run_dir(tmp_path):
    # two phases in one run_dir keep separate checkpoints and share one metrics file
    train, test = loaders()
    model = make_model()
    Trainer(model, train, test, cfg(max_steps=3), run_dir=tmp_path, phase="train").fit()
    snapshot = copy.deepcopy(model.state_dict())
    Trainer(model, train, test, cfg(max_steps=2), run_dir=tmp_path, phase="finetune").fit()
    assert (tmp_path / "checkpoints" / "train.pt").exists() and (tmp_path / "checkpoints" / "finetune.pt").exists()
    assert not torch.equal(snapshot["fc.weight"], model.state_dict()["fc.weight"])
    phases = {r["phase"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert phases == {"train", "finetune"}


# ---------------------------------------------------------------- hook set and one step's parts
def test_hook_set_calls_every_should_stop_and_adds_extra_losses_in_order():
    from regprune.engine.hooks import HookSet

    seen = []

    class Stop:
        def __init__(self, name, stop, term):
            self.name, self.stop, self.term = name, stop, term

        def should_stop(self, trainer):
            seen.append(self.name)
            return self.stop

        def extra_loss(self, trainer, model, outputs):
            return self.term

        def no_weight_decay_params(self):
            return [nn.Parameter(torch.zeros(1))]

    hooks = HookSet([Stop("a", True, torch.tensor(1.0)), Stop("b", False, None), object()])
    trainer = type("T", (), {"world_size": 1, "device": torch.device("cpu")})()
    assert hooks.should_stop(trainer) and seen == ["a", "b"]
    assert float(hooks.add_extra_losses(trainer, None, None, torch.tensor(2.0))) == 3.0
    assert len(hooks.no_weight_decay_params()) == 2
    assert not HookSet([object()]).should_stop(trainer)


def test_step_parts_place_the_batch_and_build_the_optimizer():
    from regprune.engine.build import build_optimizer, check_phase, steps_per_epoch
    from regprune.engine.step import place_batch

    x, y = place_batch({"input": torch.zeros(2, 1, 4, 4), "target": torch.zeros(2, dtype=torch.long)},
                       torch.device("cpu"), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and y.shape == (2,)
    opt = build_optimizer(TinyNet(), TrainConfig(lr=0.05, no_wd_bn_bias=True))
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"] and opt.defaults["lr"] == 0.05
    with pytest.raises(UserError, match="phase name"):
        check_phase("a/b")
    with pytest.raises(UserError, match="yields no batches"):
        steps_per_epoch([])


def test_run_state_is_shared_by_the_loop_and_the_checkpoints(tmp_path):
    train, test = loaders()
    t = Trainer(make_model(), train, test, cfg(max_steps=12), run_dir=tmp_path)
    run = t.run_state
    assert (run.started, run.checkpoint_step, run.final_step, run.last_loss) == (False, -1, -1, None)
    t.fit()
    assert run.started and run.stage == "idle" and run.inflight is None and not run.interrupt_requested
    assert run.checkpoint_step == run.final_step == run.last_eval_step == 12
    assert t.last_loss == float(run.last_loss) and not run.stats.pending
    t2 = Trainer(make_model(seed=5), train, test, cfg(max_steps=12), run_dir=tmp_path)
    t2.load_checkpoint(t.checkpoint_path)
    loaded = t2.run_state
    assert loaded.started and (loaded.checkpoint_step, loaded.final_step, loaded.last_eval_step) == (12, 12, 12)
    assert loaded.stats.state_dict() == run.stats.state_dict()


def test_engine_modules_stay_small_and_use_no_private_name_of_another_module():
    """regprune/engine/: modules of at most ~400 lines; a `_name` (import or attribute) is only used in the module
    that defines it (torch's own classes, reached through `nn.`/`torch.`, aside)."""
    import ast
    from pathlib import Path

    import regprune.engine

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for path in sorted(Path(regprune.engine.__file__).parent.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 410, f"{path.name} has {len(text.splitlines())} lines"
        tree = ast.parse(text)
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                names = [a.name for a in node.names if private(a.name)]
                assert not names, f"{path.name} imports {names} from {node.module}"
            elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in defined:
                owner = ast.unparse(node.value)
                assert owner.startswith(("nn.", "torch.")), f"{path.name}:{node.lineno} uses {owner}.{node.attr}"
            elif isinstance(node, ast.keyword) and node.arg is not None:
                assert not private(node.arg), f"{path.name}:{node.lineno} passes {node.arg}="
