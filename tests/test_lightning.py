"""RegPruneCallback: GReg-1 / SPM pruning inside a real lightning.Trainer run (CPU, a few steps, random data)."""

import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import regprune
from regprune.errors import UserError
from regprune.methods.greg import GRegConfig

pl = pytest.importorskip("lightning.pytorch")
from regprune.integrations.lightning import RegPruneCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Lit(pl.LightningModule):
    def __init__(self, lr: float = 0.01, momentum: float = 0.9, only_fc: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyNet()
        self.lr, self.momentum, self.only_fc = lr, momentum, only_fc
        self.example_input_array = torch.randn(2, 3, 8, 8)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        params = self.model.fc.parameters() if self.only_fc else self.parameters()
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


def loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=8)


def trainer(max_steps: int, callbacks: list, **kw) -> "pl.Trainer":
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def held(opt) -> list[int]:
    return [id(p) for g in opt.param_groups for p in g["params"]]


class AfterPrune(pl.Callback):
    """Snapshots the parameters and the optimizer's hold on them at the first batch end after pruning."""

    def __init__(self, cb: RegPruneCallback) -> None:
        self.cb = cb
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.all_in_optimizer: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.cb.pruned and self.snapshot is None:
            self.snapshot = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.model = copy.deepcopy(pl_module.model)  # as saved: pruning and saving happened in this hook
            ids = held(trainer.optimizers[0])
            self.all_in_optimizer = sorted(ids) == sorted(id(p) for p in pl_module.parameters())


def test_greg1_prunes_in_run_then_finetunes_and_saves(tmp_path):
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=4, save_path=str(tmp_path / "pruned"))
    probe = AfterPrune(cb)
    lit = Lit()
    dense = copy.deepcopy(lit.model)
    t = trainer(12, [cb, probe])
    t.fit(lit, loader())

    planned = GRegConfig.scaled(4, "greg1").planned_iters("greg1")["total"]
    assert cb.pruned and cb.pruned_at_step == planned < 12
    assert t.global_step == 12  # fine-tuning went on in the same run
    assert lit.model.c1.weight.shape == (4, 3, 3, 3) and lit.model.c2.weight.shape == (8, 4, 3, 3)
    assert cb.summary["params_after"] < cb.summary["params_before"]
    # the optimizer holds exactly the pruned model's parameters, with momentum of the new shapes
    opt = t.optimizers[0]
    assert probe.all_in_optimizer
    assert sorted(held(opt)) == sorted(id(p) for p in lit.parameters())
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in lit.parameters())
    # every parameter was updated by fine-tuning after pruning
    unchanged = [n for n, p in lit.named_parameters() if torch.equal(p.detach(), probe.snapshot[n])]
    assert unchanged == []
    # the file written at pruning time loads onto the dense architecture and gives the pruned model's outputs
    assert cb.saved_path == str(tmp_path / "pruned.safetensors")
    loaded, meta = regprune.load(cb.saved_path, model=dense)
    assert meta["method"] == "greg1" and meta["step"] == planned
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), probe.model.eval()(x))
    assert loaded.c1.out_channels == 4


class GradAt(pl.Callback):
    """Records, at on_before_optimizer_step, c1's gradient and weight (placed before/after RegPruneCallback)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.batches: list = []
        self.models: list[nn.Module] = []
        self.stepped: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append([b.clone() for b in batch])
        self.models.append(copy.deepcopy(pl_module.model))  # the network before this step's forward

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(pl_module.model.c1.weight.grad.detach().clone())
        self.weights.append(pl_module.model.c1.weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.stepped.append(pl_module.model.c1.weight.detach().clone())


def test_penalty_lands_on_unscaled_gradient_under_amp_scaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    lr = 0.1
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=40, log_metrics=False)
    lams: list[torch.Tensor] = []

    class Lambda(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            lams.append(cb.regularizer.greg.lambdas()["c1"].clone())

    before, after = GradAt(), GradAt()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t = trainer(4, [before, cb, after, Lambda()], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(Lit(lr=lr, momentum=0.0), loader())

    assert not cb.pruned and scaler.get_scale() == 1024.0  # no step skipped for overflow
    assert max(float(lam.max()) for lam in lams) > 0  # the penalty was on for some steps
    picks = cb.regularizer.picks()["c1"]
    for i, lam in enumerate(lams):
        w = before.weights[i]
        # the gradient Lightning hands the hook is unscaled (not 1024x): it matches a plain autocast backward of the
        # same batch without any scaler
        ref = before.models[i].train()
        x, y = before.batches[i]
        with torch.autocast("cpu", dtype=torch.half):
            loss = F.cross_entropy(ref(x), y)
        loss.backward()
        g_ref = ref.c1.weight.grad
        assert torch.allclose(before.grads[i], g_ref, rtol=0.02, atol=0.01 * float(g_ref.abs().max()))
        # the hook added exactly lambda * W, only on the filters being pruned
        expect = lam.view(-1, 1, 1, 1) * w
        assert torch.allclose(after.grads[i] - before.grads[i], expect, atol=1e-6)
        assert int(torch.count_nonzero(lam)) in (0, len(picks)) and torch.all(lam[[k for k in range(8) if k not in picks]] == 0)
        # and SGD stepped with it unscaled: W' = W - lr * (g + lambda * W)
        assert torch.allclose(before.stepped[i], w - lr * (before.grads[i] + expect), atol=1e-6)


def test_spm_reconfigures_exactly_and_stops(tmp_path):
    x_fixed = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    class Out(pl.Callback):
        def __init__(self) -> None:
            self.outs: list[tuple[bool, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            net = pl_module.model
            net.eval()
            with torch.no_grad():
                self.outs.append((cb.pruned, net(x_fixed)))
            net.train()

    cb = RegPruneCallback("spm", target_macs=0.5, iters=3, mac_norm="dense", alpha_mac=20.0, stop_after_prune=True,
                          save_path=str(tmp_path / "spm.safetensors"))
    gated, pruned = Out(), Out()
    lit = Lit(lr=0.1)
    dense = copy.deepcopy(lit.model)
    t = trainer(20, [gated, cb, pruned])
    t.fit(lit, loader())

    assert cb.pruned and cb.pruned_at_step == 3 and t.global_step == 3  # stop_after_prune ended the run
    assert not hasattr(lit.model, "regprune_gates")
    assert cb.summary["params_after"] < cb.summary["params_before"]
    # same batch end: the gated network's output (before) equals the reconfigured one's (after)
    assert [p for p, _ in gated.outs] == [False] * 3 and [p for p, _ in pruned.outs] == [False, False, True]
    assert torch.allclose(gated.outs[-1][1], pruned.outs[-1][1], atol=1e-5)
    assert sorted(held(t.optimizers[0])) == sorted(id(p) for p in lit.parameters())
    loaded, meta = regprune.load(cb.saved_path, model=dense)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x_fixed), lit.model.eval()(x_fixed), atol=1e-6)
    assert meta["method"] == "spm"


def test_resume_schedule_from_checkpoint_and_prune_on_fit_end(tmp_path):
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=50, log_metrics=False)
    lit = Lit()
    t = trainer(3, [cb])
    with pytest.warns(UserWarning, match="NOT pruned"):
        t.fit(lit, loader())
    assert not cb.pruned and cb.regularizer.status()["iteration"] == 3
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    cb2 = RegPruneCallback("greg1", ratios="c1:0.5", iters=50, prune_on_fit_end=True, log_metrics=False)
    t2 = trainer(5, [cb2])
    t2.fit(Lit(), loader(), ckpt_path=str(ckpt))
    assert cb2.steps == 5 and cb2.regularizer.greg.iteration == 5
    assert cb2.pruned and cb2.pruned_at_step == 5


def test_unstructured_greg_holds_masked_weights_at_zero_while_finetuning():
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=4, unstructured=True, log_metrics=False)
    lit = Lit()
    t = trainer(10, [cb])
    t.fit(lit, loader())
    assert cb.pruned and cb.pruned_at_step < t.global_step == 10
    w = lit.model.c1.weight
    assert w.shape == (8, 3, 3, 3)  # masks, not surgery
    assert int((w == 0).sum()) == w.numel() // 2


@pytest.mark.parametrize("args, kwargs, match", [
    (("l1",), {}, "unknown method"),
    (("spm",), {"ratios": "c1:0.5", "iters": 3}, "ratios= is a GReg option"),
    (("spm",), {"target_macs": 0.5}, "SPM would never prune"),
    (("spm",), {"iters": 3, "alpha": 1.0}, "unknown SPM option 'alpha'"),
    (("greg1",), {"ratios": "c1:0.5", "reg_upper": 1.0}, "unknown GReg option 'reg_upper'"),
    (("greg1",), {"ratios": "c1:0.5", "groups": "scope"}, "groups= is an SPM option"),
    (("greg2",), {"ratios": "c1:0.5", "iters": 0}, "iters=0"),
])
def test_constructor_rejects_mistakes(args, kwargs, match):
    with pytest.raises(UserError, match=match):
        RegPruneCallback(*args, **kwargs)


def test_checked_arguments_fold_iters_and_leave_options_alone():
    from regprune.integrations.callback_options import check_arguments

    common = dict(ratios=None, speedup=None, target_macs=None, config=None, skip=None, round_to=None,
                  include_coupled=False, unstructured=False, groups="all", prune_on_fit_end=False)
    opts = {"alpha_mac": 1.0}
    got = check_arguments("SPM", **{**common, "speedup": 2.0, "iters": 5}, options=opts)
    assert got.method == "spm" and got.target_macs == 0.5 and got.iters == 5
    assert got.options == {"alpha_mac": 1.0, "freeze_after": 5} and opts == {"alpha_mac": 1.0}
    got = check_arguments("GReg-1", **{**common, "ratios": "0.5", "iters": 8, "unstructured": True}, options={})
    assert got.method == "greg1" and got.iters is None and got.options == {} and got.config.unstructured


def test_fit_time_mistakes_are_user_errors():
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=4)
    with pytest.raises(UserError, match="no optimizer holds model.c1.weight"):
        trainer(2, [cb]).fit(Lit(only_fc=True), loader())
    cb = RegPruneCallback("greg1", ratios="c1:0.5", iters=4, module="backbone")
    with pytest.raises(UserError, match="module='backbone'"):
        trainer(2, [cb]).fit(Lit(), loader())


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "regprune.integrations.lightning")
    with pytest.raises(UserError, match=r"pip install 'regprune\[lightning\]'"):
        importlib.import_module("regprune.integrations.lightning")


def test_importing_regprune_does_not_need_lightning():
    code = ("import sys; sys.modules['lightning'] = None; import regprune, regprune.integrations, regprune.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('lightning') and sys.modules[m] is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_lightning import Lit, loader, trainer
    import lightning.pytorch as pl
    from regprune.integrations.lightning import RegPruneCallback

    class Report(pl.Callback):
        def __init__(self, run):
            self.run = run

        def on_train_end(self, t, m):
            ids = sorted(id(p) for g in t.optimizers[0].param_groups for p in g["params"])
            # one file per run and rank: the two processes share stdout
            with open(f"report_{{self.run}}_{{t.global_rank}}.json", "w") as f:
                json.dump({{"rank": t.global_rank, "step": t.global_step,
                  "sum": sum(float(p.double().sum()) for p in m.parameters()),
                  "in_opt": ids == sorted(id(p) for p in m.parameters()),
                  "ddp_params": sum(p.numel() for p in t.strategy.model.parameters()),
                  "params": sum(p.numel() for p in m.parameters())}}, f)

    if __name__ == "__main__":
        for method, kw in (("greg1", dict(ratios="c1:0.5", iters=4)),
                           ("spm", dict(target_macs=0.5, iters=3, mac_norm="dense", alpha_mac=20.0))):
            lit = Lit(lr=0.1)
            with torch.no_grad():  # the ranks start apart: DDP broadcasts rank 0's weights, GReg must pick from those
                for p in lit.parameters():
                    p.add_(0.05 * int(os.environ.get("LOCAL_RANK", 0)))
            t = trainer(8, [RegPruneCallback(method, **kw), Report(method)], devices=2, strategy="ddp")
            t.fit(lit, loader())
        if torch.distributed.is_initialized():  # leave together: a rank exiting with live gloo threads can abort
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_two_cpu_processes_prune_alike(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("greg1", "spm"):
        a, b = (json.loads((tmp_path / f"report_{method}_{rank}.json").read_text()) for rank in (0, 1))
        assert a["step"] == b["step"] == 8 and a["in_opt"] and b["in_opt"]
        assert a["sum"] == b["sum"]  # both ranks pruned the same channels and stayed in sync
        assert a["ddp_params"] == a["params"] < sum(p.numel() for p in TinyNet().parameters())  # DDP wraps the pruned net
