"""What every job shares: the run directory, data and loaders, models (new, base to prune), training settings,
evaluation and the summary row of a report."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .. import engine as E
from ..counting import count_macs, count_params
from ..data import DataBundle, load_data, make_loaders
from ..errors import UserError, first_line
from ..forward import run_in_mode
from ..models import create_model, model_info
from ..surgery import load_model
from .options import FinetuneOptions, JobOptions, TrainOptions

__all__ = ["RunDir", "start_run", "train_config", "load_job_data", "job_loaders", "example_input", "assumed_shapes",
           "model_kwargs", "new_model", "NO_BASE", "load_base", "check_pretrained", "check_forward", "JobInputs",
           "job_inputs", "evaluate_on", "summary_row"]


# ---------------------------------------------------------------------------------------------- run dirs
class RunDir:
    """One directory per run; refuses to clobber an existing run unless told, records finished phases."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False, write: bool = True) -> None:
        if not str(path).strip():
            raise UserError("the run directory is empty: --out must name a directory")
        self.path = Path(path)
        self.write = write
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} is a file, not a directory")
        if resume:
            if not (self.path / "state.json").exists():
                raise UserError(f"cannot resume: {self.path} holds no regprune run (no state.json)")
            state = self._read_state()  # before the write probe below: a run that cannot resume is not touched
        elif self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise UserError(f"run directory {self.path} already exists and is not empty; "
                                "pass --overwrite to replace it or --resume to continue it")
            if not is_run_dir(self.path):
                raise UserError(f"{self.path} is not a regprune run directory (no options.json or state.json): "
                                "--overwrite clears only runs; choose a new or empty directory")
            if write:
                _clear_dir(self.path)
        if write:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"cannot write to run directory {self.path}: {exc.strerror or exc}") from None
        self.state: dict[str, Any] = state if resume else {"done": [], "results": {}}

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.path / "state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot resume: {self.path / 'state.json'} is unreadable ({exc})") from None
        if (not isinstance(state, dict) or not isinstance(state.get("done"), list)
                or not isinstance(state.setdefault("results", {}), dict)):
            raise UserError(f"cannot resume: {self.path / 'state.json'} is not a regprune run state")
        return state

    def done(self, phase: str) -> bool:
        """Whether `phase` is recorded as finished."""
        return phase in self.state["done"]

    def mark(self, phase: str, **results: Any) -> None:
        """Record a finished phase (atomically)."""
        if phase not in self.state["done"]:
            self.state["done"].append(phase)
        self.state["results"].update(E.log.to_jsonable(results))
        self.save_state()

    def save_state(self) -> None:
        """Write state.json (when this RunDir writes)."""
        if self.write:
            E.atomic_write_text(self.path / "state.json", json.dumps(self.state, indent=1))

    def checkpoint(self, phase: str) -> Path | None:
        """The engine's checkpoint of `phase`, None when there is none."""
        p = self.path / "checkpoints" / f"{phase}.pt"
        return p if p.exists() else None

    def file(self, name: str) -> Path:
        """The path of `name` in the run directory."""
        return self.path / name


RUN_FILES = ("options.json", "state.json")


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a regprune run (its options.json or state.json), or only such runs (a demo folder)."""
    if any((path / f).is_file() for f in RUN_FILES):
        return True
    children = list(path.iterdir())
    return bool(children) and all(c.is_dir() and not c.is_symlink() and is_run_dir(c) for c in children)


def _clear_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()



def train_config(o: JobOptions, phase: TrainOptions | FinetuneOptions | None = None, *, epochs: float | None = None,
                 lr: float | None = None, schedule: str | None = None, warmup: float | None = None,
                 max_steps: int | None = None) -> E.TrainConfig:
    """The engine's TrainConfig for one phase: epochs, lr, lr schedule and warm-up epochs from `phase` (`o.train` or
    `o.finetune`; a warm-up of None is 0) unless given, optionally `max_steps` (optimizer steps), everything else
    (optimizer, batch, device, seed, checkpoints, progress) from the options."""
    if phase is not None:
        epochs = phase.epochs if epochs is None else epochs
        lr = phase.lr if lr is None else lr
        schedule = phase.lr_schedule if schedule is None else schedule
        warmup = phase.warmup_epochs if warmup is None else warmup
    t, r = o.train, o.run
    return E.TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, lr_schedule=schedule, warmup_epochs=warmup or 0.0,
                         momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay,
                         no_wd_bn_bias=t.no_wd_bn_bias, label_smoothing=t.label_smoothing,
                         batch_size=o.data.batch_size, amp=r.amp, channels_last=r.channels_last, device=r.device,
                         seed=r.seed, checkpoint_every=r.checkpoint_every, progress=r.progress)


def load_job_data(o: JobOptions) -> DataBundle:
    """The dataset of the options (`data`, limited to `limit_train` / `limit_test` images)."""
    return load_data(o.data.name, limit_train=o.data.limit_train, limit_test=o.data.limit_test)


def job_loaders(o: JobOptions, bundle: DataBundle, batch_size: int | None = None):
    """(train loader, test loader) at `batch_size` (default the options'), sharded when distributed."""
    return make_loaders(bundle, batch_size or o.data.batch_size, workers=o.data.workers,
                        distributed=E.is_distributed(), seed=o.run.seed)


def example_input(bundle: DataBundle) -> torch.Tensor:
    """One zero image shaped like the dataset's (what tracing and counting need)."""
    return torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)


_KNOWN_SHAPES = {"mnist5k": (1, 28, 10), "fashion-mnist": (1, 28, 10), "digits": (1, 8, 10), "cifar10": (3, 32, 10),
                 "cifar100": (3, 32, 100), "imagefolder": (3, 224, 1000)}
_TRAIN_SIZES = {"mnist5k": 4000, "fashion-mnist": 60000, "digits": 1437, "cifar10": 50000, "cifar100": 50000,
                "imagefolder": 1281167}


def assumed_shapes(o: JobOptions) -> tuple[int, int, int, int]:
    """(channels, image side, classes, training images) a dataset spec implies, without reading any data (dry runs)."""
    key = o.data.name.split(":", 1)[0].lower()
    ch, size, classes = _KNOWN_SHAPES.get(key, (3, model_info(o.run.model).input_size, 10))
    return ch, size, classes, o.data.limit_train or _TRAIN_SIZES.get(key, 0)


def model_kwargs(o: JobOptions) -> dict[str, Any]:
    """Model constructor arguments beyond the dataset's shapes (the CIFAR ResNet shortcut option)."""
    return {"shortcut": o.run.shortcut} if o.run.shortcut else {}


def new_model(o: JobOptions, bundle: DataBundle) -> nn.Module:
    """A freshly initialised model for the dataset (seeded)."""
    torch.manual_seed(o.run.seed)
    return create_model(o.run.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels, **model_kwargs(o))


NO_BASE = ("pruning needs a trained base: --base FILE (a regprune model file), --base pretrained "
            "(torchvision weights), or --base random to prune an untrained network on purpose")


def load_base(o: JobOptions, bundle: DataBundle) -> nn.Module:
    """The trained model to prune: a model file, torchvision's published weights, or (only by name) random init."""
    if o.prune.base is None:
        raise UserError(NO_BASE)
    if o.prune.base == "random":
        return new_model(o, bundle)
    if o.prune.base == "pretrained":
        return _pretrained(o, bundle)
    model, _ = load_model(o.prune.base)
    name = getattr(model, "regprune_arch", {}).get("name")
    if name and o.run.model and name != o.run.model:
        raise UserError(f"--base {o.prune.base} holds a {name}, but --model says {o.run.model}")
    kw = getattr(model, "regprune_arch", {}).get("kwargs", {})
    if kw.get("num_classes", bundle.num_classes) != bundle.num_classes or kw.get("in_channels", bundle.in_channels) != bundle.in_channels:
        raise UserError(f"--base {o.prune.base} was built for {kw.get('num_classes')} classes / {kw.get('in_channels')} "
                        f"input channels, but {bundle.name} has {bundle.num_classes} / {bundle.in_channels}")
    return model


def check_pretrained(o: JobOptions) -> None:
    """Raise UserError unless the model has torchvision's published weights."""
    if model_info(o.run.model).family != "torchvision":
        raise UserError(f"--base pretrained is for torchvision.* models; {o.run.model} has no published weights")


def _pretrained(o: JobOptions, bundle: DataBundle) -> nn.Module:
    check_pretrained(o)
    if bundle.num_classes != 1000 or bundle.in_channels != 3:
        raise UserError(f"torchvision's weights for {o.run.model} are for 1000 classes of RGB images; "
                        f"{bundle.name} has {bundle.num_classes} classes and {bundle.in_channels} channel(s)")
    from torchvision import models as tvm

    tv_name = o.run.model.split(".", 1)[1]
    try:
        weights = tvm.get_model_weights(tv_name).DEFAULT
        model = tvm.get_model(tv_name, weights=weights)
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError when offline without a cache
        raise UserError(f"cannot get torchvision's pretrained weights for {tv_name}: not in torch's cache "
                        f"({torch.hub.get_dir()}/checkpoints) and no network ({type(exc).__name__})") from None
    model.regprune_arch = {"name": o.run.model, "kwargs": {"num_classes": 1000, "in_channels": 3}}
    return model


def check_forward(name: str, model: nn.Module, bundle: DataBundle) -> None:
    """Run `model` once on `example_input(bundle)` (`forward.run_in_mode`: eval mode, no gradients; every module's
    mode flag and attributes are put back).

    Raises:
        UserError: the forward fails (e.g. the dataset's images are too small for the architecture); the message
            names the model `name`, the dataset and its input size, and gives the first line of the error.
    """
    x = example_input(bundle)
    try:
        run_in_mode(model, x, train=False)
    except RuntimeError as exc:
        raise UserError(f"model {name} does not run on the {'x'.join(map(str, x.shape[1:]))} images of {bundle.name}: "
                        f"the input is too small for the architecture, or of the wrong shape ({first_line(exc)})") from None


class JobInputs(NamedTuple):
    """What a job reads before it writes anything: its dataset and the model it starts from."""

    bundle: DataBundle
    model: nn.Module
    planned: Any = None  # a prune job's (graph, plan) for `model`, once made (`runner.check_inputs`)


def job_inputs(o: JobOptions, kind: str) -> JobInputs:
    """The dataset of the options and the model a `kind` job starts from (the base to prune for "prune", a new
    model for "train" and "scratch"), checked to run on one of the dataset's images. The job runner reads them
    before it opens the run directory, so a mistake found here leaves an old run (even with --overwrite) as it was.

    Raises:
        UserError: the data spec cannot be read; no base, or one that cannot be read or does not fit the data
            (`load_base`); the model does not run on the dataset's images (`check_forward`).
    """
    bundle = load_job_data(o)
    model = load_base(o, bundle) if kind == "prune" else new_model(o, bundle)
    check_forward(o.run.model, model, bundle)
    return JobInputs(bundle, model)


def evaluate_on(model: nn.Module, loader, device: str) -> dict[str, float]:
    """Test metrics ("top1", "top5" in %, "loss") of `model` over `loader` on `device` ("auto", "cpu", "cuda").

    The model is moved to `device` for the evaluation and back to the device its parameters were on."""
    dev = E.resolve_device(device, E.get_local_rank())
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    try:
        return E.evaluate(model.to(dev), loader, dev)
    finally:
        model.to(home)


def summary_row(label: str, model: nn.Module, x: torch.Tensor, metrics: dict[str, float] | None) -> dict[str, Any]:
    """The numbers a user compares for one model (one function for every report)."""
    metrics = metrics or {}
    return {"model": label, "top1": round(metrics.get("top1", float("nan")), 2),
            "top5": round(metrics.get("top5", float("nan")), 2) if "top5" in metrics else "",
            "params_M": round(count_params(model) / 1e6, 4), "MMACs": round(count_macs(model, x) / 1e6, 3)}


def start_run(o: JobOptions, *, overwrite: bool = False, resume: bool = False, job: str | None = None) -> RunDir:
    """Join the distributed group (if launched as one) and open the run directory `o.run.out` for the `job` kind
    ("train", "prune", "scratch"; recorded in state.json, and a resumed run of another kind is refused).

    Rank 0 alone checks and prepares the directory (options.json, state.json), then tells the others: were every
    rank to check, a slow one could find rank 0's fresh files, refuse "already exists" and leave rank 0 waiting in
    a collective. Raises UserError (on every rank) when rank 0 cannot open it."""
    E.init_distributed()
    run, error = None, None
    if E.is_main():
        try:
            run = RunDir(o.run.out, overwrite=overwrite, resume=resume, write=True)
            kind = run.state.get("job")
            if resume and job and kind and kind != job:
                raise UserError(f"cannot resume: {run.path} is a {kind} run, not a {job} run "
                                f"(use `regprune {kind} --resume {run.path}`)")
            if job:
                run.state["job"] = job
            E.atomic_write_text(run.file("options.json"), json.dumps(asdict(o), indent=1))
            run.save_state()
        except UserError as exc:
            error = str(exc)
    error = E.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    if run is None:
        run = RunDir(o.run.out, overwrite=True, resume=resume, write=False)
    return run


def discard_unstarted(run: RunDir) -> bool:
    """Remove a fresh run directory that holds nothing but its options.json and state.json (a job that failed on
    a user mistake before any work was saved), so the same command can be run again; True when removed. Rank 0
    only; a directory with anything else in it is left as it is."""
    if not E.is_main() or not run.path.is_dir():
        return False
    entries = list(run.path.iterdir())
    if any(e.name not in RUN_FILES and not (e.is_dir() and not any(e.iterdir())) for e in entries):
        return False
    for e in entries:
        e.rmdir() if e.is_dir() else e.unlink()
    run.path.rmdir()
    return True
