"""The jobs behind the commands: train a base, prune it (L1, GReg-1, GReg-2), prune from scratch (SPM), evaluate.

Each job works in one run directory, records what it finished in `state.json`, and picks up from there
(and from the engine's checkpoints) when resumed, so a killed run loses at most one checkpoint interval.

Modules: `options` (the one configuration schema, JobOptions, and where its values come from), `runner`
(the one job runner: `run_job(kind, options)`), `common` (run directory, data, models,
evaluation), `train`, `prune`, `scratch`, `report` (the one report writer), `plan` (dry runs, inspect) and
`debug` (per-rank dumps of distributed runs).
"""

from .common import RunDir, assumed_shapes, example_input, load_base, new_model, start_run, summary_row
from .options import JobOptions, merge_options
from .prune import check_options, greg_config, prune_job, prune_plan
from .runner import check_job, dry_run_text, run_job
from .train import eval_job, train_job

__all__ = ["JobOptions", "merge_options", "run_job", "check_job", "dry_run_text", "RunDir", "start_run",
           "train_job", "prune_job", "eval_job", "load_base", "summary_row", "example_input", "new_model", "assumed_shapes", "check_options", "greg_config",
           "prune_plan"]
