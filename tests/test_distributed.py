"""Two CPU ranks (gloo) train through the Trainer under torchrun; weights must agree and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import hashlib, json, os, sys

    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from regprune.engine import Trainer, TrainConfig, all_gather_object, cleanup, init_distributed, read_metrics
    from regprune.models import create_model


    class L2OnGrads:
        """A regularizer-style hook: adds lam * W to every weight gradient after backward."""

        def __init__(self):
            self.calls = 0

        def after_backward(self, trainer):
            self.calls += 1
            for p in trainer.model.parameters():
                if p.grad is not None and p.dim() > 1:
                    p.grad.add_(p.detach(), alpha=1e-3)

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = int(state["calls"])


    def main():
        out_dir = sys.argv[1]
        rank, world, local_rank = init_distributed()
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 8, 8, generator=g)
        y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
        ds = TensorDataset(x, y)
        train = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=True, seed=0))
        test = DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, shuffle=False))
        torch.manual_seed(100 + rank)  # different init per rank: DDP must start everyone from rank 0's weights
        model = create_model("resnet20", num_classes=2, in_channels=1)
        hook = L2OnGrads()
        run_dir = os.path.join(out_dir, f"run_rank{rank}")  # per-rank dirs make "who wrote" observable
        trainer = Trainer(model, train, test,
                          TrainConfig(max_steps=6, lr=0.05, device="cpu", progress=False, log_every=2,
                                      checkpoint_every=3, lr_schedule="cosine"),
                          run_dir=run_dir, hooks=[hook])
        summary = trainer.fit()
        flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
        files = sorted(str(p.relative_to(run_dir)) for p in __import__("pathlib").Path(run_dir).rglob("*")) \
            if os.path.isdir(run_dir) else []
        info = {"rank": rank, "world": trainer.world_size, "is_main": trainer.is_main, "step": trainer.step,
                "steps_per_epoch": trainer.steps_per_epoch, "hook_calls": hook.calls,
                "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "eval": summary["eval"],
                "files": files, "wrapped": type(trainer.forward_model).__name__,
                "model_is_unwrapped": trainer.model is model, "records": len(trainer.metrics)}
        infos = all_gather_object(info)
        if rank == 0:
            metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            result = {"ranks": infos, "metrics_lines": len(metrics),
                      "metric_steps": [(r["kind"], r["step"]) for r in metrics]}
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(result, f)
        cleanup()


    if __name__ == "__main__":
        main()
''')


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo needed")
def test_two_rank_ddp_training_agrees_and_only_rank0_writes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # force the gloo/CPU path even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    r0, r1 = sorted(result["ranks"], key=lambda r: r["rank"])
    assert r0["world"] == r1["world"] == 2
    assert r0["is_main"] and not r1["is_main"]
    assert r0["wrapped"] == "DistributedDataParallel" and r0["model_is_unwrapped"]
    assert r0["steps_per_epoch"] == 4  # 64 samples / 2 ranks / batch 8
    assert r0["step"] == r1["step"] == 6 and r0["hook_calls"] == r1["hook_calls"] == 6
    # identical weights and buffers on both ranks despite different initialisations
    assert r0["digest"] == r1["digest"]
    # evaluation is all-reduced, so both ranks report the same numbers over the whole test set
    assert r0["eval"] == r1["eval"] and r0["eval"]["n"] == 64
    # only rank 0 wrote files; its metrics file holds each record exactly once
    assert r1["files"] == []
    assert "metrics.jsonl" in r0["files"] and "checkpoints/train.pt" in r0["files"]
    assert not [f for f in r0["files"] if f.endswith(".tmp")]
    assert result["metrics_lines"] == r0["records"]
    assert result["metric_steps"] == [["interval", 2], ["interval", 4], ["epoch", 4], ["interval", 6],
                                      ["final", 6]]
