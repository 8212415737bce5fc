"""The one job runner: train, prune and scratch are configurations of it (`run_job(kind, options)`), and so is the
demo (a train job and a prune job). It checks the options before anything is written, opens the run directory
(options.json, state.json; joins the distributed group when launched as one), runs the job and returns its
table and the lines a user reads."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import UserError
from ..models import model_info
from .common import JobInputs, RunDir, discard_unstarted, example_input, job_inputs, start_run, train_config
from .options import JobOptions
from .prune import check_options, prune_job, prune_plan
from .scratch import scratch_job, scratch_plan_text, spm_overrides, spm_settings
from .train import train_job

__all__ = ["JOB_KINDS", "check_job", "check_inputs", "dry_run_text", "run_job"]

JOB_KINDS: dict[str, Callable[..., dict[str, Any]]] = {  # (options, run dir, inputs=JobInputs) -> results
    "train": train_job, "prune": prune_job, "scratch": scratch_job}


def check_job(kind: str, o: JobOptions) -> None:
    """The mistakes visible in the options alone (no data, model file or run directory needed); UserError."""
    if kind not in JOB_KINDS:
        raise UserError(f"unknown job {kind!r}: expected one of {', '.join(JOB_KINDS)}")
    if kind == "scratch":
        model_info(o.run.model)
        s = spm_settings(0, o.train.epochs, spm_overrides(o))  # bad SPM settings or a missing target fail here
        train_config(o, o.train, warmup=s["warmup_epochs"]).validate()
    else:
        check_options(o, kind)


def check_inputs(kind: str, o: JobOptions, inputs: JobInputs) -> JobInputs:
    """The mistakes visible once the data and the starting model are read (`job_inputs`): for a prune job, a plan
    that cannot be made (a ratio pattern that matches nothing, ratios that prune nothing, ...); UserError.
    Returns `inputs` with a prune job's (graph, plan) in `planned`, for the job to use."""
    if kind == "prune":
        return inputs._replace(planned=prune_plan(o, inputs.model, example_input(inputs.bundle)))
    return inputs


def dry_run_text(kind: str, o: JobOptions) -> str:
    """What a job would do, without data or training (`--dry-run`): the prune plan or the search plan."""
    from .plan import prune_plan_text

    if kind == "prune":
        return prune_plan_text(o)
    if kind == "scratch":
        return scratch_plan_text(o)
    raise UserError(f"a {kind} job has no dry run")


def _lines(kind: str, out: dict[str, Any], run: RunDir) -> list[str]:
    if kind == "train":
        return [f"model written to {run.file('model.safetensors')}"]
    if kind == "prune":
        rep = out["report"]
        return [f"MACs speedup {rep['macs_speedup']:.2f}x; CPU latency, batch 1: {rep['latency_verdict_b1']}; "
                f"batch 64: {rep['latency_verdict_b64']}; run in {run.path}"]
    return []


def run_job(kind: str, o: JobOptions, *, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Check the options, open the run directory `o.run.out` (`overwrite` an existing one, or `resume` it), run
    the `kind` job ("train", "prune" or "scratch") and return its results: the job's own ("table", and "report"
    or "row"), plus "run" (the RunDir) and "lines" (what to print after the table). Raises UserError on a mistake
    in the options, the data, the base model (or a model that does not run on the data: `job_inputs`), the prune
    plan or the run directory before anything is written or cleared; on a later one, a fresh run directory is
    removed again."""
    check_job(kind, o)
    inputs = job_inputs(o, kind)  # before the run directory: with --overwrite, a typo must not cost the old run
    inputs = check_inputs(kind, o, inputs)
    run = start_run(o, overwrite=overwrite, resume=resume, job=kind)
    try:
        out = JOB_KINDS[kind](o, run, inputs=inputs)
    except UserError:
        if not resume:  # a mistake found with the data or the base model: leave nothing to --overwrite
            discard_unstarted(run)
        raise
    return {**out, "run": run, "lines": _lines(kind, out, run)}
