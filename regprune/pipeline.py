"""Former home of the jobs, now in `regprune.jobs`; the names other code imports from here stay available."""

from __future__ import annotations

from .jobs.common import RunDir, assumed_shapes, example_input, load_base, new_model, summary_row
from .jobs.options import JobOptions
from .jobs.prune import check_options, greg_config, prune_job, prune_plan
from .jobs.report import prune_report
from .jobs.train import eval_job, train_job

_report = prune_report  # the name tests/test_latency.py imports

__all__ = ["RunDir", "JobOptions", "train_job", "prune_job", "eval_job", "load_base", "summary_row", "prune_plan",
           "greg_config", "check_options", "assumed_shapes", "example_input", "new_model", "prune_report"]
