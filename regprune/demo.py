"""The main job: train a base on the bundled MNIST sample, GReg-1 to about 2x fewer MACs, fine-tune, report: two
configurations of the one job runner (`jobs.runner.run_job`)."""

from __future__ import annotations

import time
from pathlib import Path

from .jobs import JobOptions, RunDir
from .jobs.runner import run_job

__all__ = ["run_demo"]


def run_demo(out: str | Path = "runs/demo", overwrite: bool = False, quick: bool = False) -> dict:
    """Run base training, GReg-1 at 2x, fine-tuning and the before/after table; returns the prune report."""
    out = Path(out)
    RunDir(out, overwrite=overwrite)  # refuses a non-empty folder unless overwrite, before any training
    t0 = time.perf_counter()
    common = dict(model="resnet20", data="mnist5k", batch_size=64, seed=0, progress=True)
    if quick:
        common.update(limit_train=400, limit_test=200, progress=False)
    base = JobOptions.from_dict(dict(common, out=str(out / "base"), epochs=1 if quick else 5, lr=0.1,
                                     lr_schedule="cosine", weight_decay=5e-4))
    print(f"[1/2] training the dense base: {base.run.model} on {base.data.name}, {base.train.epochs:g} epochs", flush=True)
    run_job("train", base)
    prune = JobOptions.from_dict(dict(common, out=str(out / "greg1"), method="greg1",
                                      base=str(out / "base" / "model.safetensors"), speedup=2.0,
                                      reg_iters=30 if quick else 600, ft_epochs=1 if quick else 3, ft_lr=0.01,
                                      ft_lr_schedule="cosine"))
    print(f"[2/2] GReg-1 to {prune.prune.speedup:g}x fewer MACs ({prune.prune.reg_iters} regularization iterations), "
          f"then {prune.finetune.epochs:g} fine-tuning epochs", flush=True)
    result = run_job("prune", prune)
    print()
    print(result["table"])
    rep = result["report"]
    print(f"\nMACs speedup {rep['macs_speedup']:.2f}x; CPU latency, batch 1: {rep['latency_verdict_b1']}; "
          f"batch 64: {rep['latency_verdict_b64']}")
    print(f"pruned model: {Path(prune.run.out) / 'model.safetensors'}; plots: {Path(prune.run.out) / 'plots'}; "
          f"total {time.perf_counter() - t0:.0f} s")
    return rep
