"""The train job (a dense base from scratch) and the eval job (a model file on a dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import engine as E
from ..data import load_data, make_loaders
from ..errors import UserError
from ..report import format_table
from ..surgery import load_model, save_model
from .common import JobInputs, RunDir, evaluate_on, example_input, job_inputs, job_loaders, summary_row, train_config
from .options import JobOptions

__all__ = ["train_job", "eval_job"]


def train_job(o: JobOptions, run: RunDir, inputs: JobInputs | None = None) -> dict[str, Any]:
    """Train a dense base model from scratch and write run/model.safetensors. `inputs`: the dataset and new model
    when already read (default: `job_inputs(o, "train")`). Raises UserError on a mistake in the data or the model
    (see `job_inputs`) or in training settings."""
    bundle, model, _ = inputs or job_inputs(o, "train")
    train_loader, test_loader = job_loaders(o, bundle)
    if run.done("train"):
        model, _ = load_model(run.file("model.safetensors"))
    else:
        cfg = train_config(o, o.train)
        trainer = E.Trainer(model, train_loader, test_loader, cfg, run_dir=run.path, phase="train")
        trainer.fit(resume_from=run.checkpoint("train"))
        metrics = evaluate_on(model, test_loader, o.run.device)
        if E.is_main():
            save_model(model.cpu(), run.file("model.safetensors"),
                       {"dataset": bundle.name, "top1": metrics["top1"], "epochs": o.train.epochs, "seed": o.run.seed,
                        "input_size": bundle.image_size})
        run.mark("train", base=metrics)
    x = example_input(bundle)
    row = summary_row(o.run.model, model.cpu(), x, run.state["results"].get("base"))
    return {"table": format_table([row], list(row)), "row": row}


def eval_job(model_file: str, data: str, batch_size: int, device: str, limit_test: int | None = None) -> dict[str, Any]:
    """Evaluate a model file on a dataset."""
    model, meta = load_model(model_file)
    bundle = load_data(data, limit_test=limit_test, augment=False)
    kw = getattr(model, "regprune_arch", {}).get("kwargs", {})
    if kw.get("num_classes", bundle.num_classes) != bundle.num_classes:
        raise UserError(f"{model_file} predicts {kw.get('num_classes')} classes but {bundle.name} has {bundle.num_classes}")
    _, test_loader = make_loaders(bundle, batch_size)
    metrics = evaluate_on(model, test_loader, device)
    row = summary_row(Path(model_file).name, model.cpu(), example_input(bundle), metrics)
    return {"table": format_table([row], list(row)), "row": row, "meta": meta}
